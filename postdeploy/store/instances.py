"""Instances as kept in Redis: one app on one host, as its worker last reported it.

The reports themselves are made by :mod:`postdeploy.trigger.instances`; this is
what every reader (status, placement, verdicts) sees of them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any

import redis

from postdeploy.store import keys

GONE_AFTER = 3  # missed reports (intervals) after which an instance is gone
DONE_TTL = 90 * 86_400  # seconds an instance remembers a deployment ran there


@dataclass(frozen=True)
class Instance:
    """One app on one host, as last reported."""

    host: str
    sha: str | None
    ready: bool | None  # None: the app sets no readiness gate (or it cannot be read)
    seen_at: float
    boot_id: str = ""
    every: float = 30.0  # the reporter's interval: gone after GONE_AFTER of them
    answer: str | None = None  # what the health endpoint last answered

    def gone(self, now: float) -> bool:
        return now - self.seen_at > GONE_AFTER * self.every

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str | bytes) -> Instance:
        data: dict[str, Any] = json.loads(raw)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def public(self) -> dict[str, Any]:
        """The stable JSON shape of `status --json`: host, sha, ready, seen_at."""
        return {"host": self.host, "sha": self.sha, "ready": self.ready,
                "seen_at": self.seen_at}


class InstanceRegistry:
    """Reports in Redis: one hash per app, host -> its latest report."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def report(self, reports: Iterable[tuple[str, Instance]]) -> None:
        """Store many reports in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        for app, instance in reports:
            pipe.hset(keys.instances(app), instance.host, instance.to_json())
        pipe.execute()

    def live(self, app: str, now: float | None = None) -> list[Instance]:
        """The app's instances reported within their last three intervals, by host."""
        now = time.time() if now is None else now
        found: list[tuple[bytes | str, Instance]] = []
        gone: list[tuple[bytes | str, Instance]] = []
        for host, raw in self.client.hgetall(keys.instances(app)).items():
            instance = Instance.from_json(raw)
            (gone if instance.gone(now) else found).append((host, instance))
        if gone:  # forget them, so the hash does not grow with every host ever seen
            self.client.hdel(keys.instances(app), *[host for host, _ in gone])
        return sorted((i for _, i in found), key=lambda i: i.host)

    # -- scope instance: once per deployment on each host, in each boot ------------
    def instance_done(self, app: str, host: str, boot_id: str, deployment: int) -> bool:
        return bool(self.client.exists(keys.instance_done(app, host, boot_id, deployment)))

    def mark_instance_done(self, app: str, host: str, boot_id: str, deployment: int,
                           run_id: str) -> None:
        pipe = self.client.pipeline()
        pipe.set(keys.instance_done(app, host, boot_id, deployment), run_id, ex=DONE_TTL)
        pipe.delete(keys.instance_claim(app, host, deployment))
        pipe.execute()
