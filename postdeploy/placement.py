"""Placement: on which host a commit's job runs, decided by every host each interval.

Each worker's host loop calls :meth:`HostPlacement.reconcile` with the reports
it just made (see :mod:`postdeploy.instances`):

- A ``path`` app's commit is per host. The app's commit (last seen) is the
  newest commit any live instance has, newest by when it was first reported,
  so a host behind the others never makes it flip back. Only a host whose
  working copy is at that commit claims its run, and sends it to its own
  queue: a job never runs in a working copy at another commit, and a host
  that has not pulled the commit yet neither runs it nor marks it done.
- POST_DEPLOY_SCOPE ``instance``: every host runs each commit once when it
  reaches it, in its own working copy (or checkout), again after the host
  reboots (a new boot id), not after a restart of the executor.

A claim made here names the host and lives a few intervals; the host's loop
renews it while its run is unfinished. So when a host disappears (powered
off, its worker killed), its claims lapse and another host that has the
commit takes the run over.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import redis

from postdeploy import keys, lifecycle
from postdeploy.appspec import DEFAULT_TIMEOUT, SCOPE_APP, SCOPE_INSTANCE
from postdeploy.config import AppConfig, Settings
from postdeploy.errors import GitError
from postdeploy.gitsource import AppSource
from postdeploy.instances import GONE_AFTER, Instance, InstanceRegistry, LocalSpecs
from postdeploy.records import RunRecord, Status, Trigger
from postdeploy.state import DONE_TTL, StateStore

log = logging.getLogger(__name__)

# Done-marker value of a commit whose job runs per instance (the app-wide marker then
# only says "decided"; each host keeps its own marker).
INSTANCE_SCOPE_MARK = "scope:instance"
MIN_CLAIM_TTL = 10  # seconds: even with a 1 s interval a claim outlives a busy moment


@dataclass(frozen=True)
class RunRequest:
    """An automatic run to put on ``host``'s queue."""

    app: str
    sha: str
    run_id: str
    timeout: int | None
    host: str
    scope: str


Enqueue = Callable[[RunRequest], None]


def claim_ttl(interval: float) -> int:
    """Seconds a host's claim lives without renewal: the time an instance takes to go."""
    return max(MIN_CLAIM_TTL, int(GONE_AFTER * interval + 1))


class HostPlacement:
    """This host's part in placing runs; one per worker, called from its host loop."""

    def __init__(self, settings: Settings, store: StateStore, registry: InstanceRegistry,
                 specs: LocalSpecs, enqueue: Enqueue) -> None:
        self.settings = settings
        self.store = store
        self.client = store.client
        self.registry = registry
        self.specs = specs
        self.enqueue = enqueue
        self.ttl = claim_ttl(settings.check_interval)
        self._mine: dict[str, str] = {}  # claim key -> id of our unfinished run

    def reconcile(self, reports: Iterable[tuple[str, Instance]]) -> list[RunRequest]:
        """Claim and queue what this host should run now; return what was queued."""
        self._renew_claims()
        mine = [(app, instance) for name, instance in reports
                if instance.sha is not None and (app := self.settings.app(name)) is not None]
        # A repo app's scope is learned by the commit check (it reads the appspec) and
        # left in the commit's done marker: one round trip for every repo app.
        repo = [(app, instance) for app, instance in mine if app.repo]
        marks = self.client.mget([keys.done(a.name, i.sha or "") for a, i in repo]) \
            if repo else []
        per_instance = {a.name for (a, _), mark in zip(repo, marks, strict=True)
                        if _text(mark) == INSTANCE_SCOPE_MARK}
        queued: list[RunRequest] = []
        for app, instance in mine:
            try:
                if app.path and (request := self._path_app(app, instance)):
                    queued.append(request)
                if (app.path or app.name in per_instance) and (
                        request := self._instance(app, instance)):
                    queued.append(request)
            except redis.RedisError:
                raise
            except Exception:  # one app's trouble never stops the others
                log.exception("placement of %s failed", app.name)
        return queued

    # -- scope app, path apps ---------------------------------------------------
    def _path_app(self, app: AppConfig, instance: Instance) -> RunRequest | None:
        live = self.registry.live(app.name)
        newest = self.registry.newest_commit(app.name, live) or instance.sha
        assert newest is not None
        pipe = self.client.pipeline(transaction=False)
        pipe.set(keys.last_seen(app.name), newest)
        pipe.set(keys.checked_at(app.name), repr(time.time()))
        pipe.execute()
        if instance.sha != newest:
            log.debug("%s: this host is at %s, behind %s; a host that has it runs it",
                      app.name, instance.sha[:7] if instance.sha else "-", newest[:7])
            return None
        local = self.specs.get(app, newest)
        if local.spec is not None and local.spec.scope == SCOPE_INSTANCE:
            self.client.set(keys.done(app.name, newest), INSTANCE_SCOPE_MARK, ex=DONE_TTL)
            return None
        if not self._claim(keys.claim(app.name, newest), keys.done(app.name, newest)):
            return None
        if local.spec is not None and local.spec.command is None:
            log.info("%s@%s: POST_DEPLOY_COMMAND is not set; no job to run",
                     app.name, newest[:7])
            self.store.mark_done(app.name, newest, "no-command")
            return None
        # A malformed appspec still gets a run: the run records the problem as `error`.
        timeout = local.spec.timeout if local.spec else DEFAULT_TIMEOUT
        return self._queue(app.name, newest, timeout, SCOPE_APP, keys.claim(app.name, newest))

    # -- scope instance -------------------------------------------------------
    def _instance(self, app: AppConfig, instance: Instance) -> RunRequest | None:
        sha = instance.sha
        assert sha is not None
        host, boot = self.settings.host, self.settings.boot_id
        if app.path:
            local = self.specs.get(app, sha)
            if local.spec is None or local.spec.scope != SCOPE_INSTANCE:
                return None
            if local.spec.command is None:
                return None
            timeout: int | None = local.spec.timeout
        else:
            timeout = None  # the run reads it from the checkout
        claim = keys.instance_claim(app.name, host, sha)
        if not self._claim(claim, keys.instance_done(app.name, host, boot, sha)):
            return None
        return self._queue(app.name, sha, timeout, SCOPE_INSTANCE, claim)

    # -- claims ---------------------------------------------------------------
    def _claim(self, claim: str, done: str) -> bool:
        """Claim unless done or claimed; a done marker's expiry is refreshed meanwhile."""
        pipe = self.client.pipeline(transaction=False)
        pipe.expire(done, DONE_TTL)
        pipe.set(claim, self.settings.host, nx=True, ex=self.ttl)
        is_done, claimed = pipe.execute()
        if is_done and claimed:
            self.client.delete(claim)
        return bool(claimed) and not is_done

    def _queue(self, app: str, sha: str, timeout: int | None, scope: str,
               claim: str) -> RunRequest:
        self._retire_stale(app, sha, scope)
        record = RunRecord.new(app, sha, Trigger.AUTO.value)
        record.timeout = timeout
        record.host = self.settings.host
        self.store.add_run(record)
        request = RunRequest(app, sha, record.id, timeout, self.settings.host, scope)
        try:
            self.enqueue(request)
        except Exception:
            self.client.delete(claim)
            raise
        self._mine[claim] = record.id
        where = "on this host" if scope == SCOPE_APP else "for this instance"
        log.info("%s@%s: POST_DEPLOY job queued %s (run %s)", app, sha[:7], where, record.id)
        return request

    def _renew_claims(self) -> None:
        """Keep the claims of our unfinished runs; let those of finished runs go."""
        if not self._mine:
            return
        records = {claim: self.store.get_run(run_id) for claim, run_id in self._mine.items()}
        pipe = self.client.pipeline(transaction=False)
        for claim, record in records.items():
            if record is None or Status(record.status).finished:
                del self._mine[claim]
            else:
                pipe.expire(claim, self.ttl)
        pipe.execute()

    def _retire_stale(self, app: str, sha: str, scope: str) -> None:
        retire_stale(self.store, app, sha,
                     self.settings.host if scope == SCOPE_INSTANCE else None)


def retire_stale(store: StateStore, app: str, sha: str, host: str | None = None) -> None:
    """Automatic runs of ``sha`` (on ``host``) queued or waiting on a host that went away.

    Called only when a claim of the commit could be taken again, that is when
    nobody kept the old one alive; such a run never starts any more.
    """
    for record in store.history(app, 20):
        if record.sha != sha or record.trigger != Trigger.AUTO.value:
            continue
        if host is not None and record.host != host:
            continue
        if record.status in (Status.QUEUED, Status.WAITING) and lifecycle.move(
                store, record, Status.SUPERSEDED,
                reason=f"{record.host or 'its host'} stopped before the run started; the "
                       "commit was queued again"):
            log.warning("%s@%s: run %s given up: %s", app, sha[:7], record.id,
                        record.reason)


def forward_host(settings: Settings, store: StateStore, app: AppConfig, sha: str) -> str | None:
    """For a run of a ``path`` app sent to any host: a host whose working copy is at
    ``sha``, when this one's is not (None: run here, or nowhere better)."""
    if app.path is None or working_copy_problem(settings, app, sha) is None:
        return None
    at_commit = [i for i in InstanceRegistry(store.client).live(app.name)
                 if i.sha == sha and i.host != settings.host]
    at_commit.sort(key=lambda i: (i.ready is False, i.host))
    return at_commit[0].host if at_commit else None


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


# -- the run's side: is this host the right place for it, now? ----------------------
@dataclass(frozen=True)
class RunPlace:
    """Where a run was sent (None: the shared queue, any host) and its scope."""

    host: str | None = None
    scope: str = SCOPE_APP

    @property
    def per_instance(self) -> bool:
        return self.scope == SCOPE_INSTANCE and self.host is not None

    @property
    def slot(self) -> str | None:
        """The host whose instance the run occupies (scope instance), else None: the app."""
        return self.host if self.per_instance else None

    def lock_key(self, app: str) -> str:
        """One run per app at a time; per instance for scope instance."""
        if self.per_instance:
            assert self.host is not None
            return keys.instance_lock(app, self.host)
        return keys.run_lock(app)

    def claim_key(self, app: str, sha: str) -> str:
        if self.per_instance:
            assert self.host is not None
            return keys.instance_claim(app, self.host, sha)
        return keys.claim(app, sha)


def skip_reason(settings: Settings, store: StateStore, app: AppConfig, sha: str,
                place: RunPlace) -> str | None:
    """Why an automatic run of ``sha`` should not run (any more): None if it should."""
    if place.per_instance:
        assert place.host is not None
        registry = InstanceRegistry(store.client)
        if registry.instance_done(app.name, place.host, settings.boot_id, sha):
            return f"commit {sha[:7]} already ran on {place.host} since it booted"
        if app.repo and (latest := store.last_seen(app.name)) and latest != sha:
            return f"commit {sha[:7]} is no longer the latest ({latest[:7]} is)"
        return None
    if store.is_done(app.name, sha):
        return f"commit {sha[:7]} already ran"
    latest = store.last_seen(app.name)
    if latest and latest != sha:
        return f"commit {sha[:7]} is no longer the latest ({latest[:7]} is)"
    return None


def working_copy_problem(settings: Settings, app: AppConfig, sha: str) -> str | None:
    """A job never runs in a working copy at another commit: why not here, or None."""
    if app.path is None:
        return None  # a repo app's checkout is made at exactly the run's commit
    try:
        head = AppSource(app, settings.state_dir).current_sha()
    except GitError as exc:
        return str(exc)
    if head == sha:
        return None
    return (f"the working copy of {app.name} on {settings.host} is at {head[:7]}, "
            f"not {sha[:7]}")


def mark_done(settings: Settings, store: StateStore, app: str, sha: str, run_id: str,
              place: RunPlace) -> None:
    """The automatic run of ``sha`` finished: for the fleet, or for this instance."""
    if place.per_instance:
        assert place.host is not None
        InstanceRegistry(store.client).mark_instance_done(app, place.host, settings.boot_id,
                                                          sha, run_id)
    else:
        store.mark_done(app, sha, run_id)


def mark_cancelled(settings: Settings, store: StateStore, record: RunRecord) -> None:
    """A cancelled automatic run's commit is not run again: on its instance, for scope
    instance (the commit's app-wide marker says so), else for the fleet."""
    mark = _text(store.client.get(keys.done(record.app, record.sha)))
    if mark != INSTANCE_SCOPE_MARK or not record.host:
        store.mark_done(record.app, record.sha, record.id)
        return
    registry = InstanceRegistry(store.client)
    # The instance's own boot (the cancel may come from another machine).
    boot = next((i.boot_id for i in registry.live(record.app) if i.host == record.host),
                settings.boot_id)
    registry.mark_instance_done(record.app, record.host, boot, record.sha, record.id)


def release_claim(store: StateStore, app: str, sha: str, place: RunPlace) -> None:
    """Not done, not ours: let a host that has the commit claim it again."""
    store.release_claim(app, sha, place.slot)
