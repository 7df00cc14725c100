"""The one place that moves a run from status to status.

Every change of a stored run goes through :func:`move`: the allowed moves are
listed in ``TRANSITIONS``, timestamps are set here, and the record is saved once.
The stored status is checked and replaced in one Lua script, so of two writers
racing (a stalled worker and the run that declared it lost, a revoke and the job's
own end) only an allowed move wins, and a finished run never changes again. The
run's own moves carry its lock's fencing token (:mod:`postdeploy.store.fencing`): once
another run holds the lock, they are refused.
"""

from __future__ import annotations

import logging
import time
from dataclasses import fields

from postdeploy.errors import PostdeployError
from postdeploy.store.deployments import Deployment
from postdeploy.store.fencing import Fence
from postdeploy.store.records import RunRecord, Status, Trigger
from postdeploy.store.state import StaleFence, StateStore

log = logging.getLogger(__name__)

# From each unfinished status, where a run may go. A status moving to itself is an
# update of other fields (the command once read, a new output size). Finished
# statuses have no entry: nothing leaves them.
TRANSITIONS: dict[Status, frozenset[Status]] = {
    Status.QUEUED: frozenset({Status.QUEUED, Status.WAITING, Status.RUNNING,
                              Status.SUPERSEDED, Status.CANCELLED, Status.ERROR}),
    Status.WAITING: frozenset({Status.WAITING, Status.RUNNING, Status.FAILED,
                               Status.SUPERSEDED, Status.CANCELLED, Status.ERROR,
                               Status.LOST}),
    Status.RUNNING: frozenset({Status.RUNNING, Status.SUCCEEDED, Status.FAILED,
                               Status.TIMED_OUT, Status.ERROR, Status.LOST,
                               Status.CANCELLED}),
}
UNSTARTED = frozenset({Status.QUEUED, Status.WAITING})  # no job process exists yet
_FIELDS = frozenset(f.name for f in fields(RunRecord)) - {"id", "app", "sha", "trigger",
                                                          "status", "deployment",
                                                          "previous_sha"}


class InvalidTransition(PostdeployError):
    """A move the lifecycle does not allow (a bug in the caller, not a race)."""


def allowed(source: Status, target: Status) -> bool:
    return target in TRANSITIONS.get(source, frozenset())


def sources_of(target: Status) -> frozenset[Status]:
    """The statuses a run may be in to move to ``target``."""
    return frozenset(s for s, targets in TRANSITIONS.items() if target in targets)


def new_run(store: StateStore, app: str, sha: str, trigger: Trigger | str,
            timeout: int | None = None, deployment: Deployment | None = None,
            host: str | None = None, gated: bool | None = None) -> RunRecord:
    """Store a new queued run on the app's history: the one place runs are created.

    ``deployment``: the one it runs for, when known; ``host``: the host it is sent to;
    ``gated``: whether its appspec sets a readiness gate, when the caller read it.
    """
    record = RunRecord.new(app, sha, trigger, deployment)
    record.timeout = timeout
    record.host = host
    record.gated = gated
    store.add_run(record)
    return record


def move(store: StateStore, record: RunRecord, target: Status, *, fence: Fence | None = None,
         only_from: frozenset[Status] | None = None, **changes: object) -> bool:
    """Move ``record`` to ``target`` with ``changes`` to its other fields; one save.

    True when stored. False when the run is finished (it never changes again), had
    meanwhile moved somewhere ``target`` cannot be reached from (or, given
    ``only_from``, to a status outside it), or ``fence`` no longer holds the run's
    lock: ``record`` then holds what is stored. Raises InvalidTransition for a move
    that is never allowed from ``record``'s own, unfinished status.
    """
    if record.status.finished:
        if record.status != target:
            log.info("run %s is %s already; not moving it to %s", record.id, record.status,
                     target)
        return False
    if not allowed(record.status, target):
        raise InvalidTransition(f"run {record.id}: {record.status} cannot become {target}")
    unknown = set(changes) - _FIELDS
    if unknown:
        raise InvalidTransition(f"run {record.id}: cannot set {', '.join(sorted(unknown))}")
    wanted = _copy(record)
    for name, value in changes.items():
        setattr(wanted, name, value)
    now = time.time()
    if target == Status.RUNNING and wanted.started_at is None:
        wanted.started_at = now
    if target.finished:
        wanted.finished_at = now
    wanted.status = target
    counter = f"{record.app}\t{record.trigger}\t{target}" if target.finished else None
    ran = target.finished and wanted.started_at is not None and wanted.finished_at is not None
    duration = (wanted.finished_at or 0) - (wanted.started_at or 0) if ran else None
    sources = sources_of(target) if only_from is None else sources_of(target) & only_from
    try:
        stored = store.replace_run(wanted, sources, counter, fence, duration)
    except StaleFence as stale:
        log.warning("run %s: another run holds its lock now (fencing token %s is stale); "
                    "not recording it %s", record.id, fence.token if fence else "?", target)
        if stale.stored is not None:
            _assign(record, stale.stored)
        return False
    if stored is not None:
        if stored.status != target:
            log.info("run %s is %s already; not moving it to %s", record.id, stored.status,
                     target)
        _assign(record, stored)
        return False
    _assign(record, wanted)
    return True


def update(store: StateStore, record: RunRecord, *, fence: Fence | None = None,
           **changes: object) -> bool:
    """Change fields of an unfinished run without moving it; False if it finished meanwhile."""
    return move(store, record, record.status, fence=fence, only_from=None, **changes)


def _copy(record: RunRecord) -> RunRecord:
    return RunRecord.from_json(record.to_json())


def _assign(record: RunRecord, source: RunRecord) -> None:
    for f in fields(RunRecord):
        setattr(record, f.name, getattr(source, f.name))
