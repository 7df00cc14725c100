"""What the webhook service keeps in Redis: deliveries already received, each app's last push."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import redis

from postdeploy import keys

# Seconds a delivery id is remembered: longer than any host retries or lets a user
# press "Redeliver" on a recent delivery (GitHub keeps deliveries for 3 days).
DELIVERY_TTL = 7 * 86_400

# One round trip and atomic: a delivery seen before changes nothing; a new one is
# remembered and stamps its apps' last push time.
_RECORD = """
if ARGV[3] == '1' then
  if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then return 0 end
end
for i = 2, #KEYS do redis.call('SET', KEYS[i], ARGV[1]) end
return 1
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
        pipe = self.client.pipeline(transaction=False)
        for item in deliveries:
            # A delivery without an id still needs a key slot; it is never written.
            first = item.key or keys.webhook_delivery(item.provider, "-")
            self._record(keys=[first, *(keys.last_push(a) for a in item.apps)],
                         args=[repr(item.arrived), DELIVERY_TTL, "1" if item.key else "0"],
                         client=pipe)
        return [bool(result) for result in pipe.execute()]

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
