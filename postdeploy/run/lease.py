"""The run's lease as its job guard keeps it, and the clock that fences the job.

The lease is the run lock (and the commit's claim) in Redis, with a TTL. The
guard renews it from a thread of its own, so no Redis call, however stuck (a
silent partition, a slow DNS answer, a retry), ever delays the guard's main
loop. The main loop fences by its *own* clock: counted from the moment the last
successful renewal was *sent* (Redis starts the TTL later, when it runs it), it
stops the job at ``fence_after`` and has it dead by ``kill_by``, both well
before Redis can let the lease lapse. With a lease of T seconds:

    TERM  at T/2 (+ at most one look, TICK) after the last good renewal was sent
    KILL  at T - KILL_MARGIN at the latest (the grace is cut short to fit)
    lapse at T at the earliest; only then can another host take the lock

The clock is CLOCK_BOOTTIME, which also counts a suspended machine: a host
that was frozen (SIGSTOP, a VM pause, a suspend) finds its lease overdue on its
first look after it resumes, and stops the job without waiting for Redis.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from postdeploy.run.stop import Stop, StopKind
from postdeploy.store import keys

TICK = 0.25  # seconds between renewals (and between the guard's looks at everything)
KILL_MARGIN = 1.0  # seconds between the job's last SIGKILL and the earliest lapse


def lease_clock() -> float:
    """Seconds on a clock that never jumps back and keeps counting while the host sleeps."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def fence_after(ttl: float) -> float:
    """Seconds without a successful renewal after which the job is stopped (SIGTERM)."""
    return max(0.5, ttl / 2)


# KEYS: lock, its fencing counter. ARGV: token, ttl in ms. Compare-and-expire: only
# the holder's token may extend the lock. A missing lock is put back only if no
# token was issued after ours (Redis lost its data, with the counter, which is put
# back too): a lock that lapsed and was taken since stays lost, even once released.
_RENEW_LOCK = """
local value = redis.call('GET', KEYS[1])
if value == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
local mine = tonumber(ARGV[1])
local issued = tonumber(redis.call('GET', KEYS[2]) or '0')
if not value and mine and issued and issued <= mine then
  redis.call('SET', KEYS[2], math.max(issued, mine))
  return redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) and 2
end
return 0
"""
_OTHER_HOLDER = 0


@dataclass(frozen=True)
class Lease:
    """What the guard keeps alive in Redis while the run lives, and where cancels arrive.

    ``connect`` makes the guard's own Redis client (it runs after the fork: the
    worker's connections are not shared). ``token`` is the run lock's fencing token.
    """

    connect: Callable[[], redis.Redis]
    lock_key: str
    token: str
    ttl: float  # seconds; the lock and the claim expire this long after the last renewal
    claim_key: str | None = None
    cancel_key: str | None = None
    # Puts back what else the run needs when Redis lost its data (the run's deployment).
    restore: Callable[[redis.Redis], object] | None = None


@dataclass(frozen=True)
class _Answer:
    sent: float  # lease_clock() just before the renewal went out
    held: bool = False
    lost: bool = False  # another run holds the lock
    cancel: str | None = None
    error: str | None = None


class LeaseKeeper:
    """Renews ``lease`` in the background; says when the job must stop, and why."""

    def __init__(self, lease: Lease) -> None:
        self.lease = lease
        self.renewed_at = lease_clock()  # the send time of the latest successful renewal
        self._client = lease.connect()
        self._wanted = threading.Event()
        self._mutex = threading.Lock()
        self._answer: _Answer | None = None  # the thread's newest, not yet looked at
        self._last: _Answer | None = None  # the newest looked at
        self._busy = False
        self._thread: threading.Thread | None = None
        self._next = 0.0
        self._last_error = "the last renewal has had no answer"

    def renew_now(self) -> Stop | None:
        """One renewal in the caller's thread (before the job starts); a stop reason or None.

        The job starts only under a lease confirmed now: the clock then counts from here.
        """
        answer = self._renew()
        self._absorb(answer)
        self._next = lease_clock() + TICK  # the thread's first renewal is a tick later
        if answer.error:
            return Stop(StopKind.LEASE_LOST, f"lease lost (cannot confirm it: {answer.error})")
        return self._verdict()

    def start(self) -> None:
        """Renew from a thread from now on (start it after the last fork of the guard)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="lease", daemon=True)
            self._thread.start()

    def look(self) -> Stop | None:
        """Ask for a renewal when one is due; why the job must stop now, or None."""
        now = lease_clock()
        with self._mutex:
            answer, self._answer = self._answer, None
            if not self._busy and now >= self._next:
                self._busy, self._next = True, now + TICK
                self._wanted.set()
        if answer is not None:
            self._absorb(answer)
        return self._verdict()

    def until_fence(self) -> float:
        """Seconds until the job must be stopped if no renewal succeeds meanwhile."""
        return self.renewed_at + fence_after(self.lease.ttl) - lease_clock()

    def kill_by(self) -> float:
        """The lease_clock() time by which every process of the job must be dead."""
        return self.renewed_at + self.lease.ttl - KILL_MARGIN

    def _verdict(self) -> Stop | None:
        answer = self._last
        if answer is not None and answer.lost:
            return Stop(StopKind.LEASE_LOST, "lease lost (another run took the app's run lock)")
        if self.until_fence() <= 0:
            waited = lease_clock() - self.renewed_at
            return Stop(StopKind.LEASE_LOST,
                        f"lease lost (no renewal for {waited:.1f} s: {self._last_error}); "
                        "stopped before it could lapse")
        if answer is not None and answer.cancel:
            return Stop(StopKind.CANCELLED, f"cancelled {answer.cancel}".strip())
        return None

    def _absorb(self, answer: _Answer) -> None:
        self._last = answer
        if answer.held:
            self.renewed_at = max(self.renewed_at, answer.sent)
        elif answer.error:
            self._last_error = answer.error

    def _loop(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            answer = self._renew()
            with self._mutex:
                self._answer, self._busy = answer, False

    def _renew(self) -> _Answer:
        lease = self.lease
        sent = lease_clock()
        try:
            pipe = self._client.pipeline(transaction=False)
            pipe.eval(_RENEW_LOCK, 2, lease.lock_key, keys.fence_counter(lease.lock_key),
                      lease.token, int(lease.ttl * 1000))
            if lease.claim_key:
                # EXPIRE, not SET: Redis at maxmemory refuses SET but not EXPIRE, and a
                # refused claim must not look like a lost lease.
                pipe.expire(lease.claim_key, max(1, int(lease.ttl)))
            if lease.cancel_key:
                pipe.get(lease.cancel_key)
            replies = pipe.execute(raise_on_error=False)
            if isinstance(replies[0], Exception):
                raise replies[0]
            if lease.claim_key and replies[1] == 0:  # lost with Redis' data: put it back
                with contextlib.suppress(redis.RedisError):
                    self._client.set(lease.claim_key, "running", ex=max(1, int(lease.ttl)))
                    if lease.restore is not None:
                        lease.restore(self._client)
        except redis.RedisError as exc:
            return _Answer(sent, error=f"cannot reach Redis: {exc}")
        except Exception as exc:  # noqa: BLE001 (the thread must live on to keep trying)
            return _Answer(sent, error=f"renewal failed: {exc!r}")
        if replies[0] == _OTHER_HOLDER:
            return _Answer(sent, lost=True)
        cancel = replies[-1] if lease.cancel_key else None
        text = cancel.decode(errors="replace") if isinstance(cancel, bytes) and cancel else None
        return _Answer(sent, held=True, cancel=text)
