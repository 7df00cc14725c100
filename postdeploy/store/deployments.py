"""Deployments: each change of an app's deployed commit, recorded once and atomically.

The job runs once per deployment, not once per commit: A→B, the rollback B→A and
A→B again are three deployments, each run once, while a re-check, a restart or a
redelivered webhook of the same commit is none. Every change is recorded by one
Lua script (a new id from the app's counter, its sha, the ``previous_sha`` it
replaced), so of any number of beats, webhooks and host loops seeing the same
change only one records it. The done, claim and lost markers are keyed by the
deployment's id (see :mod:`postdeploy.store.keys`).

- ``repo`` app: the branch head moving anywhere, backwards too, is a deployment.
  A check passes the deployment id it read before its (slow) git lookup; when
  another check recorded a deployment meanwhile, its answer may be older than
  that one's, so it records nothing (the next check decides).
- ``path`` app: each host reports its own working copy's HEAD. Only a HEAD that
  *moved* on that host can start a deployment, and only when the host left the
  fleet's commit or moved to a commit the app never had: a host that merely
  lags behind (a first report, an unchanged head, catching up through older
  commits) never undoes the fleet's commit. A host reaching the fleet's commit
  joins its deployment. The app's very first report starts its first deployment.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import redis

from postdeploy.store import keys

KEEP = 200  # deployments remembered per app (their ids keep counting)

# Shared by both scripts: start deployment seq+1 of KEYS[1] (hash) at sha, replacing
# previous ('' for none); KEYS[2] is last_seen.
_START = """
local function start(sha, previous, now)
  local hash = KEYS[1]
  local id = redis.call('HINCRBY', hash, 'seq', 1)
  local d = {id = id, sha = sha, previous_sha = previous, at = tonumber(now)}
  redis.call('HSET', hash, tostring(id), cjson.encode(d), 'current', id, 'sha:' .. sha, id)
  local old = id - tonumber(ARGV[#ARGV])
  local raw = old > 0 and redis.call('HGET', hash, tostring(old))
  if raw then
    local gone = cjson.decode(raw)
    redis.call('HDEL', hash, tostring(old))
    if tonumber(redis.call('HGET', hash, 'sha:' .. gone.sha)) == old then
      redis.call('HDEL', hash, 'sha:' .. gone.sha)
    end
  end
  return d
end
local function current()
  local id = redis.call('HGET', KEYS[1], 'current')
  if not id then return nil end
  return cjson.decode(redis.call('HGET', KEYS[1], id))
end
"""

# KEYS: deployments, last_seen, checked_at, check failure streak. ARGV: sha, current
# id read before the lookup ('' for none), now, marker prefix, claim ttl, done ttl,
# the marker of the commit before deployments were recorded, KEEP. Returns
# {deployment JSON, started, claimed, the failure streak this look ended or false};
# started is -1 when another check recorded a deployment meanwhile.
_OBSERVE = _START + """
local sha = ARGV[1]
local streak = redis.call('GETDEL', KEYS[4])
local d = current()
local started = 0
if d == nil then
  local before = redis.call('GET', KEYS[2])
  d = start(sha, (before and before ~= sha) and before or '', ARGV[3])
  started = 1
  local legacy = redis.call('GET', ARGV[7])
  if before == sha and legacy then  -- ran before deployments were recorded
    redis.call('SET', ARGV[4] .. d.id .. ':done', legacy, 'EX', ARGV[6])
  end
elseif d.sha ~= sha then
  if tostring(d.id) ~= ARGV[2] then
    return {cjson.encode(d), -1, 0, streak}
  end
  d = start(sha, d.sha, ARGV[3])
  started = 1
end
redis.call('SET', KEYS[2], d.sha)
redis.call('SET', KEYS[3], ARGV[3])
local done = ARGV[4] .. d.id .. ':done'
local claimed = 0
if redis.call('EXPIRE', done, ARGV[6]) == 0 and
    redis.call('SET', ARGV[4] .. d.id .. ':claim', 'queued', 'NX', 'EX', ARGV[5]) then
  claimed = 1
end
return {cjson.encode(d), started, claimed, streak}
"""

# KEYS: deployments, last_seen, checked_at, host heads. ARGV: host, head, now, marker
# prefix, the marker of head before deployments were recorded, done ttl, KEEP.
# Returns {the app's current deployment JSON, started, id of the latest deployment
# of head (0: never deployed)}.
_HOST_HEAD = _START + """
local host, head = ARGV[1], ARGV[2]
local before = redis.call('HGET', KEYS[4], host)
redis.call('HSET', KEYS[4], host, head)
local d = current()
local started = 0
if d == nil then
  d = start(head, '', ARGV[3])
  started = 1
  local legacy = redis.call('GET', ARGV[5])
  if legacy then  -- ran before deployments were recorded
    redis.call('SET', ARGV[4] .. d.id .. ':done', legacy, 'EX', ARGV[6])
  end
elseif d.sha ~= head and before and before ~= head and
    (before == d.sha or redis.call('HEXISTS', KEYS[1], 'sha:' .. head) == 0) then
  d = start(head, d.sha, ARGV[3])
  started = 1
end
redis.call('SET', KEYS[2], d.sha)
redis.call('SET', KEYS[3], ARGV[3])
return {cjson.encode(d), started, tonumber(redis.call('HGET', KEYS[1], 'sha:' .. head) or 0)}
"""

_CURRENT = """
local id = redis.call('HGET', KEYS[1], 'current')
if id then return redis.call('HGET', KEYS[1], id) end
return false
"""

# KEYS: deployments. ARGV: id, JSON, sha. Puts one deployment back as the current one,
# only when Redis lost the app's deployments (a restart without persistence).
_RESTORE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'seq', ARGV[1], 'current', ARGV[1], ARGV[1], ARGV[2],
           'sha:' .. ARGV[3], ARGV[1])
return 1
"""


@dataclass(frozen=True)
class Deployment:
    """One change of an app's deployed commit; ``previous_sha`` None for the first."""

    id: int
    sha: str
    previous_sha: str | None
    at: float

    def to_json(self) -> str:
        return json.dumps({"id": self.id, "sha": self.sha,
                           "previous_sha": self.previous_sha or "", "at": self.at})

    @classmethod
    def from_json(cls, raw: str | bytes) -> Deployment:
        data = json.loads(raw)
        return cls(int(data["id"]), data["sha"], data.get("previous_sha") or None,
                   float(data.get("at") or 0.0))


@dataclass(frozen=True)
class Observation:
    """What one look at an app's commit found."""

    deployment: Deployment  # the app's current deployment, after the look
    started: bool  # this look recorded it
    claimed: bool = False  # repo apps: the caller holds its claim (it needs a run)
    stale: bool = False  # another look recorded a deployment while this one ran git
    recovered: str | None = None  # repo apps: the failed checks' streak this look ended (JSON)
    mine: int | None = None  # path apps: the latest deployment of this host's head


class DeploymentLog:
    """An app's deployments in Redis: the current one, and the latest of each commit."""

    def __init__(self, client: redis.Redis, done_ttl: int) -> None:
        self.client = client
        self.done_ttl = done_ttl  # seconds a deployment's done marker lives unrefreshed
        self._observe = client.register_script(_OBSERVE)
        self._host_head = client.register_script(_HOST_HEAD)
        self._current = client.register_script(_CURRENT)

    def current(self, app: str) -> Deployment | None:
        raw = self._current(keys=[keys.deployments(app)])
        return Deployment.from_json(raw) if raw else None

    def current_id(self, app: str) -> int | None:
        value = self.client.hget(keys.deployments(app), "current")
        return int(value) if value else None

    def current_ids(self, apps: list[str]) -> list[int | None]:
        """:meth:`current_id` of each of ``apps``, in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        for app in apps:
            pipe.hget(keys.deployments(app), "current")
        return [int(v) if v else None for v in pipe.execute()] if apps else []

    def get(self, app: str, deployment: int) -> Deployment | None:
        raw = self.client.hget(keys.deployments(app), str(deployment))
        return Deployment.from_json(raw) if raw else None

    def every_of_sha(self, app: str, sha: str) -> list[Deployment]:
        """Every kept deployment of ``sha``, oldest first (`why` tells them all)."""
        raw: dict[bytes, bytes] = self.client.hgetall(keys.deployments(app))  # type: ignore[assignment]
        found = [Deployment.from_json(value) for field, value in raw.items() if field.isdigit()]
        return sorted((d for d in found if d.sha == sha), key=lambda d: d.id)

    def of_sha(self, app: str, sha: str) -> Deployment | None:
        """The latest deployment of ``sha``, if the app ever deployed it."""
        value = self.client.hget(keys.deployments(app), f"sha:{sha}")
        return self.get(app, int(value)) if value else None

    def observe(self, app: str, sha: str, seen_before: int | None,
                claim_ttl: int) -> Observation:
        """A ``repo`` app's branch is at ``sha``: record a deployment if it changed,
        and claim the current deployment's run unless it ran or is claimed.

        ``seen_before``: :meth:`current_id` as read before the git lookup. A look
        that got here ends the app's streak of failed checks (see ``recovered``).
        """
        now = time.time()
        raw, started, claimed, streak = self._observe(
            keys=[keys.deployments(app), keys.last_seen(app), keys.checked_at(app),
                  keys.check_failure(app)],
            args=[sha, "" if seen_before is None else str(seen_before), repr(now),
                  keys.deployment_prefix(app), claim_ttl, self.done_ttl,
                  keys.commit_done(app, sha), KEEP])
        return Observation(Deployment.from_json(raw), int(started) == 1, bool(claimed),
                           stale=int(started) == -1,
                           recovered=streak.decode() if isinstance(streak, bytes) else None)

    def host_head(self, app: str, host: str, head: str) -> Observation:
        """A ``path`` app's working copy on ``host`` is at ``head`` (see the module doc)."""
        raw, started, mine = self._host_head(
            keys=[keys.deployments(app), keys.last_seen(app), keys.checked_at(app),
                  keys.host_heads(app)],
            args=[host, head, repr(time.time()), keys.deployment_prefix(app),
                  keys.commit_done(app, head), self.done_ttl, KEEP])
        return Observation(Deployment.from_json(raw), bool(started), mine=int(mine) or None)


def restore(client: redis.Redis, app: str, deployment: Deployment) -> bool:
    """Put ``deployment`` back if Redis lost every deployment of ``app``; True if it did.

    A running job's guard calls this with its lease, so that the checks after the
    loss see its deployment in progress instead of recording a new one that would
    run the same commit a second time.
    """
    return bool(client.eval(_RESTORE, 1, keys.deployments(app), deployment.id,
                            deployment.to_json(), deployment.sha))
