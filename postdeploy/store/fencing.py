"""Run locks with fencing tokens: a stale holder's writes are refused by Redis.

A lease alone cannot stop a holder that was frozen or cut off from acting
after it lapsed (Kleppmann, "How to do distributed locking"). So each
acquisition of a run lock is issued a token from a counter that only grows,
in the same Lua call that takes the lock, and the lock's value *is* that token.
The run's own writes (its record, its output, the lock's release) carry the
token, and a Lua script refuses them unless the lock still holds it.

redis-py's Lock issues a random token and cannot take the lock and count in one
step, hence this small class.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from postdeploy.store import keys

# KEYS: lock, counter. ARGV: ttl in ms. Returns the new token, or 0 when held.
_ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], token, 'PX', ARGV[1])
return token
"""
# KEYS: lock. ARGV: token. Compare-and-delete.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


# A Lua function for the fenced writes' scripts: true when ``token`` may no longer
# write under ``lock``. It may while the lock holds it, and also once the lock has
# lapsed if no token was issued since: then nobody else can have acted.
FENCED_OFF = """
local function fenced_off(lock, counter, token)
  if token == '' then return false end
  local holder = redis.call('GET', lock)
  if holder then return holder ~= token end
  local issued = tonumber(redis.call('GET', counter) or '0')
  local mine = tonumber(token)
  return not (issued and mine and issued <= mine)
end
"""


@dataclass(frozen=True)
class Fence:
    """What a fenced write must show: the lock it holds and its token there."""

    lock_key: str
    token: str

    @property
    def counter_key(self) -> str:
        return keys.fence_counter(self.lock_key)


class RunLock:
    """One run of an app (or instance) at a time, across every host; see the module doc."""

    def __init__(self, client: redis.Redis, key: str, ttl: float) -> None:
        self.client = client
        self.key = key
        self.ttl = ttl
        self.token: str | None = None

    def acquire(self) -> bool:
        """Take the lock if it is free (never waits); True with a new, larger token."""
        token = int(self.client.eval(_ACQUIRE, 2, self.key, keys.fence_counter(self.key),
                                     int(self.ttl * 1000)))
        if token:
            self.token = str(token)
        return bool(token)

    def release(self) -> bool:
        """Let the lock go if it is still ours; False when it had lapsed (maybe retaken)."""
        if self.token is None:
            return False
        return bool(self.client.eval(_RELEASE, 1, self.key, self.token))

    def fence(self) -> Fence | None:
        return Fence(self.key, self.token) if self.token is not None else None
