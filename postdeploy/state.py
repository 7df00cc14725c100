"""What postdeploy remembers in Redis: seen commits, markers, runs, output tails."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

import redis

from postdeploy import keys
from postdeploy.config import AppConfig
from postdeploy.fencing import FENCED_OFF, Fence, RunLock
from postdeploy.lease import CALL_TIMEOUT
from postdeploy.records import RunRecord

DONE_TTL = 90 * 86_400  # seconds; refreshed on every check while the commit is current
QUEUED_CLAIM_TTL = 3_600  # seconds a queued automatic run blocks re-enqueueing its commit

# KEYS: run record, runs counter hash, run lock and its fencing counter ('' when
# unfenced). ARGV: new JSON, expected statuses (space separated), counter field (''
# for none), fencing token ('' for none). Returns {1} stored, {0, stored JSON}
# refused, {-1} stored although the record was missing (Redis lost its data),
# {2, stored JSON or ''} refused: the token is stale.
_REPLACE_RUN = FENCED_OFF + """
local raw = redis.call('GET', KEYS[1])
local result = {1}
if fenced_off(KEYS[3], KEYS[4], ARGV[4]) then return {2, raw or ''} end
if raw then
  local status = cjson.decode(raw)['status']
  if not string.find(' ' .. ARGV[2] .. ' ', ' ' .. tostring(status) .. ' ', 1, true) then
    return {0, raw}
  end
else
  result = {-1}
end
redis.call('SET', KEYS[1], ARGV[1])
if ARGV[3] ~= '' then redis.call('HINCRBY', KEYS[2], ARGV[3], 1) end
return result
"""
# KEYS: output hash, run lock, its fencing counter. ARGV: tail, total, fencing token.
_WRITE_OUTPUT = FENCED_OFF + """
if fenced_off(KEYS[2], KEYS[3], ARGV[3]) then return 0 end
redis.call('HSET', KEYS[1], 'tail', ARGV[1], 'total', ARGV[2])
return 1
"""
_STORED_ANEW = -1
_REFUSED = 0
_STALE = 2


class StaleFence(Exception):
    """A fenced write whose token no longer holds the run lock (another run owns the app)."""

    def __init__(self, stored: RunRecord | None) -> None:
        super().__init__("stale fencing token")
        self.stored = stored


class StateStore:
    """Typed access to postdeploy's Redis keys; every key comes from :mod:`keys`."""

    def __init__(self, client: redis.Redis, history_limit: int = 50) -> None:
        self.client = client
        self.history_limit = history_limit
        self._replace = client.register_script(_REPLACE_RUN)
        self._write_output = client.register_script(_WRITE_OUTPUT)

    # -- apps ---------------------------------------------------------------
    def register_apps(self, apps: Iterable[AppConfig]) -> None:
        mapping = {a.name: json.dumps(a.describe()) for a in apps}
        if mapping:
            self.client.hset(keys.APPS, mapping=mapping)  # type: ignore[arg-type]

    def registered_apps(self) -> dict[str, dict[str, str]]:
        raw = self.client.hgetall(keys.APPS)
        return {_text(k): json.loads(v) for k, v in sorted(raw.items())}

    # -- commits ------------------------------------------------------------
    def last_seen(self, app: str) -> str | None:
        value = self.client.get(keys.last_seen(app))
        return _text(value) if value else None

    def observe(self, app: str, sha: str, claim_ttl: int = QUEUED_CLAIM_TTL) -> bool:
        """Record ``sha`` as last seen; True if it needs a run and we claimed it.

        One round trip: the done marker's expiry is refreshed (so a long-lived
        commit never forgets it ran) and the claim is taken with SET NX.
        """
        pipe = self.client.pipeline(transaction=False)
        pipe.set(keys.last_seen(app), sha)
        pipe.set(keys.checked_at(app), repr(time.time()))
        pipe.expire(keys.done(app, sha), DONE_TTL)
        pipe.set(keys.claim(app, sha), "queued", nx=True, ex=claim_ttl)
        _, _, is_done, claimed = pipe.execute()
        if is_done and claimed:
            self.client.delete(keys.claim(app, sha))
        return bool(claimed) and not is_done

    def checked_at(self, app: str) -> float | None:
        value = self.client.get(keys.checked_at(app))
        return float(value) if value else None

    def is_done(self, app: str, sha: str) -> bool:
        return bool(self.client.exists(keys.done(app, sha)))

    def mark_done(self, app: str, sha: str, run_id: str) -> None:
        pipe = self.client.pipeline()
        pipe.set(keys.done(app, sha), run_id, ex=DONE_TTL)
        pipe.delete(keys.claim(app, sha))
        pipe.execute()

    def hold_claim(self, app: str, sha: str, ttl: int, host: str | None = None) -> None:
        """Keep the claim alive while the run works; it lapses soon after a crash.

        ``host``: the claim of that instance (scope instance), not the app's.
        """
        self.client.set(_claim(app, sha, host), "running", ex=ttl)

    def release_claim(self, app: str, sha: str, host: str | None = None) -> None:
        self.client.delete(_claim(app, sha, host))

    # -- runs ---------------------------------------------------------------
    def add_run(self, record: RunRecord) -> None:
        """Store a new run and push it on the app's capped history."""
        self.client.set(keys.run(record.id), record.to_json())
        self._push_history(record.app, record.id)

    def _push_history(self, app: str, run_id: str) -> None:
        history = keys.history(app)
        pipe = self.client.pipeline()
        pipe.lpush(history, run_id)
        pipe.lrange(history, self.history_limit, -1)
        pipe.ltrim(history, 0, self.history_limit - 1)
        dropped = pipe.execute()[1]
        if dropped:
            names = [_text(d) for d in dropped]
            self.client.delete(*[keys.run(n) for n in names], *[keys.output(n) for n in names])

    def replace_run(self, record: RunRecord, expected: Iterable[str],
                    counter: str | None = None, fence: Fence | None = None) -> RunRecord | None:
        """Store ``record`` if the stored run's status is one of ``expected``.

        One Lua call: the check, the write and, for a finished run, the count in
        ``keys.RUNS_TOTAL`` (field ``counter``). Returns None when stored, else the
        stored run that refused the change; raises StaleFence when ``fence`` no
        longer holds its lock. Only :mod:`postdeploy.lifecycle` calls it.
        """
        answer = self._replace(keys=[keys.run(record.id), keys.RUNS_TOTAL,
                                     fence.lock_key if fence else "",
                                     fence.counter_key if fence else ""],
                               args=[record.to_json(), " ".join(expected), counter or "",
                                     fence.token if fence else ""])
        if int(answer[0]) == _STALE:
            raise StaleFence(RunRecord.from_json(answer[1]) if answer[1] else None)
        if int(answer[0]) == _REFUSED:
            return RunRecord.from_json(answer[1])
        if int(answer[0]) == _STORED_ANEW:
            # Redis lost its data (no persistence): the run goes back on its history.
            self._push_history(record.app, record.id)
        return None

    def get_run(self, run_id: str) -> RunRecord | None:
        raw = self.client.get(keys.run(run_id))
        return RunRecord.from_json(raw) if raw else None

    def history(self, app: str, limit: int | None = None) -> list[RunRecord]:
        end = (limit or self.history_limit) - 1
        ids = [_text(i) for i in self.client.lrange(keys.history(app), 0, end)]
        if not ids:
            return []
        raws = self.client.mget([keys.run(i) for i in ids])
        return [RunRecord.from_json(r) for r in raws if r]

    def latest_run(self, app: str) -> RunRecord | None:
        runs = self.history(app, 1)
        return runs[0] if runs else None

    def set_active(self, app: str, run_id: str, host: str | None = None) -> None:
        self.client.set(_active(app, host), run_id)

    def take_active(self, app: str, host: str | None = None) -> str | None:
        """The run that held the app's lock last and never finished (only a lost run)."""
        value = self.client.getdel(_active(app, host))
        return _text(value) if value else None

    def clear_active(self, app: str, host: str | None = None) -> None:
        self.client.delete(_active(app, host))

    def count_lost(self, app: str, sha: str) -> int:
        """One more automatic attempt of ``sha`` died with its worker; how many so far."""
        pipe = self.client.pipeline()
        pipe.incr(keys.lost_attempts(app, sha))
        pipe.expire(keys.lost_attempts(app, sha), DONE_TTL)
        return int(pipe.execute()[0])

    def lost_attempts(self, app: str, sha: str) -> int:
        return int(self.client.get(keys.lost_attempts(app, sha)) or 0)

    def guard_client(self) -> redis.Redis:
        """A new client to the same Redis, for a job's guard (a process of its own).

        Every call bounded (connect and reply within CALL_TIMEOUT, no retry): the
        guard must know in time that it cannot renew, and stop its job.
        """
        pool = self.client.connection_pool
        kwargs = {**pool.connection_kwargs, "socket_timeout": CALL_TIMEOUT,
                  "socket_connect_timeout": CALL_TIMEOUT, "retry_on_timeout": False,
                  "retry": None, "health_check_interval": 0}
        return redis.Redis(connection_pool=redis.ConnectionPool(
            connection_class=pool.connection_class, **kwargs))

    def run_lock(self, app: str, ttl: float, host: str | None = None) -> RunLock:
        """The app's run lock, with a fencing token: one run of an app at a time.

        A holder that dies lets it lapse after ``ttl`` seconds. ``host``: the lock
        of that instance (scope instance: one run per instance).
        """
        key = keys.instance_lock(app, host) if host else keys.run_lock(app)
        return RunLock(self.client, key, ttl)

    # -- cancel requests ----------------------------------------------------
    def request_cancel(self, run_id: str, how: str, ttl: int) -> None:
        """Ask whichever worker runs ``run_id`` to stop it; ``how`` says who and how
        ("from the CLI by root@host"; the run's reason becomes "cancelled <how>")."""
        self.client.set(keys.cancel(run_id), how, ex=ttl)

    def cancel_request(self, run_id: str) -> str | None:
        """Who and how of a pending cancel of ``run_id``, or None."""
        value = self.client.get(keys.cancel(run_id))
        return _text(value) if value else None

    # -- output -------------------------------------------------------------
    def write_output(self, run_id: str, tail: bytes, total: int,
                     fence: Fence | None = None) -> bool:
        """Store the run's output tail; False when ``fence`` no longer holds its lock."""
        return bool(self._write_output(
            keys=[keys.output(run_id), fence.lock_key if fence else "",
                  fence.counter_key if fence else ""],
            args=[tail, total, fence.token if fence else ""]))

    def read_output(self, run_id: str) -> tuple[bytes, int]:
        tail, total = self.client.hmget(keys.output(run_id), ["tail", "total"])
        data = tail.encode() if isinstance(tail, str) else (tail or b"")
        return data, int(total or 0)

    # -- failing checks -----------------------------------------------------
    def check_failed(self, app: str, error: str, log_every: float) -> dict[str, Any] | None:
        """Count a failed check; return the streak when it is worth a log line.

        That is: the first failure, a different error, or ``log_every`` seconds
        since the last line, so a broken remote is reported without flooding.
        """
        now = time.time()
        raw = self.client.get(keys.check_failure(app))
        streak: dict[str, Any] = (json.loads(raw) if raw else
                                  {"error": None, "since": now, "count": 0, "logged_at": 0.0})
        streak["count"] += 1
        due = streak["error"] != error or now - streak["logged_at"] >= log_every
        streak["error"] = error
        if due:
            streak["logged_at"] = now
        pipe = self.client.pipeline()
        pipe.set(keys.check_failure(app), json.dumps(streak))
        pipe.incr(keys.check_errors(app))
        pipe.execute()
        return streak if due else None

    def check_started(self, app: str) -> None:
        """A check of ``app`` starts: pushes from now on need a check of their own."""
        self.client.delete(keys.check_pending(app))

    def check_recovered(self, app: str) -> dict[str, Any] | None:
        """End a streak of failed checks; return it (None if checks were fine)."""
        raw = self.client.getdel(keys.check_failure(app))
        return json.loads(raw) if raw else None

    def check_failure(self, app: str) -> dict[str, Any] | None:
        raw = self.client.get(keys.check_failure(app))
        return json.loads(raw) if raw else None

    # -- metrics ------------------------------------------------------------
    def check_errors(self, app: str) -> int:
        return int(self.client.get(keys.check_errors(app)) or 0)


def _claim(app: str, sha: str, host: str | None) -> str:
    return keys.instance_claim(app, host, sha) if host else keys.claim(app, sha)


def _active(app: str, host: str | None) -> str:
    return keys.instance_active(app, host) if host else keys.active_run(app)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
