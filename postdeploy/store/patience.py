"""How run code bears Redis trouble: best effort while a job runs, patience to record its end.

A job must never stop because Redis is away (its output and lease renewals are
then skipped or retried by the guard), while the record of how a run ended must
survive a Redis restart: it is retried for REDIS_PATIENCE seconds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import redis

log = logging.getLogger(__name__)

REDIS_PATIENCE = 120.0  # seconds a finished run waits for Redis to come back to record itself

T = TypeVar("T")


def quietly(action: Callable[[], T]) -> T | None:
    """Best effort while the job runs: Redis trouble must not stop the job."""
    try:
        return action()
    except redis.RedisError as exc:
        log.debug("Redis unavailable during a run: %s", exc)
        return None


def patiently(action: Callable[[], T], what: str) -> T:
    """Retry through a Redis restart, so a finished run still gets recorded."""
    deadline = time.monotonic() + REDIS_PATIENCE
    delay = 0.5
    warned = False
    while True:
        try:
            return action()
        except redis.RedisError as exc:
            if time.monotonic() > deadline:
                raise
            if not warned:
                log.warning("Redis unavailable, retrying to %s: %s", what, exc)
                warned = True
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
