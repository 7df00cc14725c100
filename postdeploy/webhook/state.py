"""What the webhook service keeps in Redis: deliveries already received, each app's last push."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import redis

from postdeploy.store import keys

# Seconds a delivery id is remembered: longer than any host retries or lets a user
# press "Redeliver" on a recent delivery (GitHub keeps deliveries for 3 days).
DELIVERY_TTL = 7 * 86_400

# One round trip for a whole batch, atomic: a delivery seen before changes nothing;
# a new one is remembered and stamps its apps' last push time. KEYS holds, per
# delivery, its mark's key (a placeholder when it has no id) and then its apps'
# last-push keys; ARGV the mark's expiry, then per delivery: has an id, arrival, apps.
_RECORD = """
local ttl, k, a, out = ARGV[1], 1, 2, {}
while a <= #ARGV do
  local has_id, arrived, apps = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
  local fresh = 1
  if has_id == '1' and not redis.call('SET', KEYS[k], arrived, 'NX', 'EX', ttl) then
    fresh = 0
  end
  if fresh == 1 then
    for j = 1, apps do redis.call('SET', KEYS[k + j], arrived) end
  end
  out[#out + 1] = fresh
  k, a = k + 1 + apps, a + 3
end
return out
"""


@dataclass(frozen=True)
class Delivery:
    """One verified push: who sent it, its id (None if the host gave none), its apps."""

    provider: str
    delivery_id: str | None
    apps: tuple[str, ...]
    arrived: float  # Unix time

    @property
    def key(self) -> str | None:
        if self.delivery_id is None:
            return None
        return keys.webhook_delivery(self.provider, self.delivery_id)


class WebhookState:
    """Typed access to the webhook's Redis keys (all from :mod:`keys`)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._record = client.register_script(_RECORD)

    def record(self, deliveries: Sequence[Delivery]) -> list[bool]:
        """For each delivery: True if it is new (and now remembered), False if a replay."""
        if not deliveries:
            return []
        names: list[str] = []
        args: list[str | int] = [DELIVERY_TTL]
        for item in deliveries:
            # A delivery without an id still takes a key slot; it is never written.
            names.append(item.key or keys.webhook_delivery(item.provider, "-"))
            names += [keys.last_push(app) for app in item.apps]
            args += ["1" if item.key else "0", repr(item.arrived), len(item.apps)]
        return [bool(flag) for flag in self._record(keys=names, args=args)]

    def claim_checks(self, apps: Sequence[str], ttl: float) -> list[str]:
        """The apps whose check must be queued: those without one queued and not
        started yet (the check clears its mark as it starts, before it looks at git,
        so a queued check sees every push that found the mark)."""
        pipe = self.client.pipeline(transaction=False)
        for app in apps:
            pipe.set(keys.check_pending(app), "1", nx=True, ex=max(1, int(ttl)))
        return [app for app, claimed in zip(apps, pipe.execute(), strict=True) if claimed]

    def release_checks(self, apps: Sequence[str]) -> None:
        """The checks could not be queued: the next push queues them."""
        if apps:
            self.client.delete(*[keys.check_pending(app) for app in apps])

    def forget(self, deliveries: Sequence[Delivery]) -> None:
        """Drop delivery marks, so that the host's retry of a failed delivery is not a replay."""
        names = [item.key for item in deliveries if item.key]
        if names:
            self.client.delete(*names)


def last_push_times(client: redis.Redis, apps: Sequence[str]) -> dict[str, float | None]:
    """When the latest push webhook for each app arrived (Unix time), or None."""
    if not apps:
        return {}
    values = client.mget([keys.last_push(app) for app in apps])
    return {app: float(value) if value else None for app, value in zip(apps, values, strict=True)}
