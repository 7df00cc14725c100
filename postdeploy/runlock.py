"""The per-app run lock: one run of an app at a time, across every host.

A random token is stored with ``SET NX PX``; only the holder can renew or
release it (compare-and-expire / compare-and-delete in Lua), and a holder that
dies simply lets it expire.
"""

from __future__ import annotations

import secrets

import redis

LOCK_TTL_MS = 60_000  # a dead holder blocks the app at most this long

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


class RunLock:
    def __init__(self, client: redis.Redis, key: str, ttl_ms: int = LOCK_TTL_MS) -> None:
        self.client = client
        self.key = key
        self.ttl_ms = ttl_ms
        self.token = secrets.token_hex(16)

    def acquire(self) -> bool:
        return bool(self.client.set(self.key, self.token, nx=True, px=self.ttl_ms))

    def renew(self) -> bool:
        """Extend the lock; False means it was lost (expired and taken by another)."""
        return bool(self.client.eval(_RENEW, 1, self.key, self.token, self.ttl_ms))

    def release(self) -> None:
        self.client.eval(_RELEASE, 1, self.key, self.token)

    def held_by_someone(self) -> bool:
        return bool(self.client.exists(self.key))
