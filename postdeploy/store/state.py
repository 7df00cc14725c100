"""What postdeploy remembers in Redis: seen commits, deployments, markers, runs, output tails."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

import redis

from postdeploy.config.settings import AppConfig
from postdeploy.store import keys
from postdeploy.store.deployments import DeploymentLog, Observation
from postdeploy.store.fencing import FENCED_OFF, Fence, RunLock
from postdeploy.store.records import RunRecord

CALL_TIMEOUT = 0.5  # seconds a guard's Redis connect or reply may take (its client's bound)
# A deployment's done marker holds the run that did it, or why none runs for the fleet:
NO_COMMAND_MARK = "no-command"  # its appspec sets no POST_DEPLOY_COMMAND
INSTANCE_SCOPE_MARK = "scope:instance"  # it runs per instance; each host keeps its own marker
DONE_TTL = 90 * 86_400  # seconds; refreshed on every check while the deployment is current
QUEUED_CLAIM_TTL = 3_600  # seconds a queued automatic run blocks re-enqueueing its deployment
# Upper bounds (seconds) of the job duration histogram's buckets: from a quick
# seed to the longest timeout.
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 86_400)

# KEYS: run record, runs counter hash, run lock and its fencing counter ('' when
# unfenced), durations histogram hash. ARGV: new JSON, expected statuses (space
# separated), counter field ('' for none), fencing token ('' for none), the app's
# histogram field prefix, the job's duration ('' for none), then the bucket bounds
# the duration falls in. Returns {1} stored, {0, stored JSON} refused, {-1} stored
# although the record was missing (Redis lost its data), {2, stored JSON or ''}
# refused: the token is stale.
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
if ARGV[6] ~= '' then
  for i = 7, #ARGV do redis.call('HINCRBY', KEYS[5], ARGV[5] .. ARGV[i], 1) end
  redis.call('HINCRBY', KEYS[5], ARGV[5] .. 'count', 1)
  redis.call('HINCRBYFLOAT', KEYS[5], ARGV[5] .. 'sum', ARGV[6])
end
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
        self.deployments = DeploymentLog(client, DONE_TTL)
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

    def observe(self, app: str, sha: str, seen_before: int | None,
                claim_ttl: int = QUEUED_CLAIM_TTL) -> Observation:
        """A ``repo`` app's branch is at ``sha``: record a deployment if that is a change,
        and claim the current deployment's run unless it ran or is claimed already.

        One Lua call; the done marker's expiry is refreshed, so a long-lived
        deployment never forgets it ran. ``seen_before``: :meth:`DeploymentLog.current_id`
        read before the git lookup.
        """
        return self.deployments.observe(app, sha, seen_before, claim_ttl)

    def checked_at(self, app: str) -> float | None:
        value = self.client.get(keys.checked_at(app))
        return float(value) if value else None

    def is_done(self, app: str, deployment: int) -> bool:
        return bool(self.client.exists(keys.done(app, deployment)))

    def done_mark(self, app: str, deployment: int) -> str | None:
        """What the deployment's done marker holds: a run id, a *_MARK, or None."""
        value = self.client.get(keys.done(app, deployment))
        return _text(value) if value is not None else None

    def mark_done(self, app: str, deployment: int, run_id: str) -> None:
        pipe = self.client.pipeline()
        pipe.set(keys.done(app, deployment), run_id, ex=DONE_TTL)
        pipe.delete(keys.claim(app, deployment))
        pipe.execute()

    def hold_claim(self, app: str, deployment: int | None, ttl: int,
                   host: str | None = None) -> None:
        """Keep the claim alive while the run works; it lapses soon after a crash.

        ``host``: the claim of that instance (scope instance), not the app's.
        ``deployment`` None (a manual run of a commit never deployed): no claim.
        """
        if deployment is not None:
            self.client.set(_claim(app, deployment, host), "running", ex=ttl)

    def release_claim(self, app: str, deployment: int | None, host: str | None = None) -> None:
        if deployment is not None:
            self.client.delete(_claim(app, deployment, host))

    # -- claims a host's placement makes (it names the claim's key: app or instance) ---
    def take_claim(self, claim: str, done: str, holder: str, ttl: int) -> bool:
        """Claim unless done or claimed; a done marker's expiry is refreshed meanwhile."""
        pipe = self.client.pipeline(transaction=False)
        pipe.expire(done, DONE_TTL)
        pipe.set(claim, holder, nx=True, ex=ttl)
        is_done, claimed = pipe.execute()
        if is_done and claimed:
            self.client.delete(claim)
        return bool(claimed) and not is_done

    def keep_claim(self, claim: str, holder: str, ttl: int) -> None:
        """(Re)set a claim this host holds, e.g. while its run waits for the gate."""
        self.client.set(claim, holder, ex=ttl)

    def keep_claims(self, claims: Iterable[str], ttl: int) -> None:
        """Extend the claims of this host's unfinished runs, in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        for claim in claims:
            pipe.expire(claim, ttl)
        pipe.execute()

    def drop_claim(self, claim: str) -> None:
        self.client.delete(claim)

    def mark_decided(self, app: str, deployment: int, mark: str) -> None:
        """Leave ``mark`` in the deployment's done marker (its scope, learned from the
        appspec), without touching its claim."""
        self.client.set(keys.done(app, deployment), mark, ex=DONE_TTL)

    # -- once-only markers and small per-app state of the announcements -------------
    def mark_once(self, key: str, ttl: int) -> bool:
        """True the first time ``key`` is marked (within ``ttl``): at most once."""
        return bool(self.client.set(key, "1", nx=True, ex=ttl))

    def set_failing(self, app: str, run_id: str, status: str) -> None:
        """The failed run ``app``'s last notification was about, until it recovers."""
        self.client.set(keys.notify_failing(app), json.dumps({"run": run_id, "status": status}))

    def pop_failing(self, app: str) -> str | None:
        """The failed run a recovery recovers from (and forget it), or None."""
        raw = self.client.getdel(keys.notify_failing(app))
        return str(json.loads(raw)["run"]) if raw else None

    def commit_status_rank(self, run_id: str) -> int:
        """0 none sent yet, 1 its pending status sent, 2 its result sent."""
        value = self.client.get(keys.commit_status_sent(run_id))
        return int(value) if value is not None else 0

    def set_commit_status_rank(self, run_id: str, rank: int, ttl: int) -> None:
        self.client.set(keys.commit_status_sent(run_id), rank, ex=ttl)

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
                    counter: str | None = None, fence: Fence | None = None,
                    duration: float | None = None) -> RunRecord | None:
        """Store ``record`` if the stored run's status is one of ``expected``.

        One Lua call: the check, the write and, for a finished run, the count in
        ``keys.RUNS_TOTAL`` (field ``counter``) and its job's ``duration`` in the
        ``keys.RUN_DURATIONS`` histogram. Returns None when stored, else the stored
        run that refused the change; raises StaleFence when ``fence`` no longer
        holds its lock. Only :mod:`postdeploy.store.lifecycle` calls it.
        """
        buckets = ([] if duration is None else
                   [f"{b:g}" for b in DURATION_BUCKETS if duration <= b] + ["+Inf"])
        answer = self._replace(keys=[keys.run(record.id), keys.RUNS_TOTAL,
                                     fence.lock_key if fence else "",
                                     fence.counter_key if fence else "", keys.RUN_DURATIONS],
                               args=[record.to_json(), " ".join(expected), counter or "",
                                     fence.token if fence else "", f"{record.app}\t",
                                     "" if duration is None else repr(duration), *buckets])
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

    def count_lost(self, app: str, deployment: int | None) -> int:
        """One more automatic attempt of ``deployment`` died with its worker; how many so far."""
        if deployment is None:
            return 0
        pipe = self.client.pipeline()
        pipe.incr(keys.lost_attempts(app, deployment))
        pipe.expire(keys.lost_attempts(app, deployment), DONE_TTL)
        return int(pipe.execute()[0])

    def lost_attempts(self, app: str, deployment: int | None) -> int:
        if deployment is None:
            return 0
        return int(self.client.get(keys.lost_attempts(app, deployment)) or 0)

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

    def check_failure(self, app: str) -> dict[str, Any] | None:
        raw = self.client.get(keys.check_failure(app))
        return json.loads(raw) if raw else None

    # -- metrics ------------------------------------------------------------
    def check_errors(self, app: str) -> int:
        return int(self.client.get(keys.check_errors(app)) or 0)


def _claim(app: str, deployment: int, host: str | None) -> str:
    return keys.instance_claim(app, host, deployment) if host else keys.claim(app, deployment)


def _active(app: str, host: str | None) -> str:
    return keys.instance_active(app, host) if host else keys.active_run(app)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
