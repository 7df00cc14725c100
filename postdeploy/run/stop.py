"""Why a guard stopped a job: the guard's typed report to its worker.

The worker decides the run's status from the kind (a cancel is ``cancelled``, a
lost lease or a stopping executor ``lost``, a dead guard ``failed``), never from
the words of the reason, which are for people.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class StopKind(StrEnum):
    ASKED = "asked"  # the worker asked: the timeout, a revoke, its own shutdown
    CANCELLED = "cancelled"  # the run's cancel request (`postdeploy cancel`, Flower)
    LEASE_LOST = "lease_lost"  # fenced: no renewal in time, or another run took the lock
    WORKER_GONE = "worker_gone"  # the worker's control pipe closed
    TERMINATED = "terminated"  # the guard itself got SIGTERM (the executor stops)
    GUARD_DIED = "guard_died"  # the guard's report pipe closed before a result


@dataclass(frozen=True)
class Stop:
    kind: StopKind
    reason: str  # for people: "cancelled from the CLI by root@web-1", "lease lost (...)"

    def later(self, suffix: str) -> Stop:
        return Stop(self.kind, f"{self.reason}{suffix}")

    @classmethod
    def from_message(cls, data: Any) -> Stop | None:
        if not isinstance(data, dict):
            return None
        return cls(StopKind(data["kind"]), str(data["reason"]))
