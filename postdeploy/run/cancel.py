"""Cancelling a run: `postdeploy cancel`, and Flower's revoke of a running job.

The request is written to Redis first, whatever the run's status looked like
(``keys.cancel``: who and how, e.g. "from the CLI by root@host"). Then a run
still queued or waiting is ended at once, in one Lua step that checks it has
not started (see :mod:`postdeploy.store.lifecycle`). A run that started meanwhile, or
was running, finds the request: its worker looks after marking it running and
before starting the job, and the job's guard, on whichever host, stops the
job's processes (SIGTERM, the grace, SIGKILL); the run is recorded ``cancelled``
with the reason "cancelled <who and how>". So a cancel never records
``cancelled`` for a job that goes on running.

Every way of cancelling ends here: the CLI, Flower's revoke (services/tasks.py
only hands Celery's signals over), the worker's look before the job starts, a
revoke that SIGTERMed the job, a run cancelled while its worker died.
"""

from __future__ import annotations

import logging
import os
import pwd
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from postdeploy.announce.run_end import announce_end
from postdeploy.config.settings import Settings
from postdeploy.errors import PostdeployError
from postdeploy.run.clock import JobClock
from postdeploy.run.place import mark_cancelled
from postdeploy.store import lifecycle
from postdeploy.store.lifecycle import UNSTARTED
from postdeploy.store.patience import quietly
from postdeploy.store.records import RunRecord, Status, Trigger
from postdeploy.store.state import StateStore

log = logging.getLogger(__name__)

CANCEL_TTL = 86_400  # seconds a cancel request waits for the worker running the run
STOP_MARGIN = 5.0  # seconds the CLI waits beyond the kill grace for the worker's record
PROGRESS_EVERY = 2.0  # seconds between "still stopping" lines while the CLI waits
POLL = 0.1  # seconds between reads of the run while the CLI waits
REVOKE_WAIT = 2.0  # seconds a SIGTERMed run waits to learn it was revoked, not shut down


class NotThatAppsRun(PostdeployError):
    """A RUN_ID that does not exist, or belongs to another app."""


class Result(StrEnum):
    CANCELLED = "cancelled"  # the run is recorded cancelled
    STOPPING = "stopping"  # asked its worker to stop it; not recorded yet
    ENDED = "ended"  # it had ended (otherwise) before the cancel took effect


@dataclass(frozen=True)
class Cancel:
    """What became of a cancel: the run as last read, and which way it went."""

    result: Result
    record: RunRecord


def cli_how() -> str:
    """Who and how, for the run's reason: "from the CLI by root@host"."""
    return f"from the CLI by {_user()}@{socket.gethostname()}"


def pick_run(store: StateStore, app: str, run_id: str | None) -> RunRecord | None:
    """``run_id`` (which must be ``app``'s), or the app's newest unfinished run, or None."""
    if run_id:
        record = store.get_run(run_id)
        if record is None or record.app != app:
            raise NotThatAppsRun(f"no run {run_id!r} of {app!r}; see `postdeploy history {app}`")
        return record
    return next((r for r in store.history(app) if not r.status.finished), None)


def other_unfinished(store: StateStore, record: RunRecord) -> list[RunRecord]:
    """The app's other runs that are still queued, waiting or running."""
    return [r for r in store.history(record.app)
            if r.id != record.id and not r.status.finished]


def request_cancel(settings: Settings, store: StateStore, record: RunRecord, how: str,
                   reason: str | None = None, stopping: bool = False) -> Cancel:
    """Cancel ``record``: at once if it has not started, else ask its worker to stop it.

    ``how`` says who and how ("from the CLI by root@host"); the run's reason
    becomes ``reason``, by default "cancelled <how>". ``stopping``: its job is
    being stopped already (a revoke that terminates it), so the run is recorded
    cancelled whatever its status.
    """
    if record.status.finished:
        return Cancel(Result.ENDED, record)
    # First the request: if the run starts between our read and our write, its
    # worker or its guard finds it (see the module doc).
    store.request_cancel(record.id, how, CANCEL_TTL)
    if record.status in UNSTARTED or stopping:
        if cancel_run(settings, store, record, reason or f"cancelled {how}",
                      only_from=None if stopping else UNSTARTED):
            return Cancel(Result.CANCELLED, record)
        # It moved meanwhile (cancel_run left what is stored in ``record``): it ended
        # (cancelled by its worker, which found the request, or otherwise), or a worker
        # started it, and then the request stops it.
    if record.status.finished:
        return Cancel(_result_of(record), record)
    log.info("asked the worker running run %s (%s@%s) to stop it: cancelled %s", record.id,
             record.app, record.sha[:7], how)
    # It may have ended between our read and the request: then nobody will stop it.
    current = store.get_run(record.id) or record
    return Cancel(_result_of(current), current)


def cancel_run(settings: Settings, store: StateStore, record: RunRecord, reason: str,
               only_from: frozenset[Status] | None = None) -> bool:
    """End an unfinished run as cancelled; its deployment is not run again automatically.

    ``only_from``: only if it is still in one of these statuses (a cancel that must
    not record ``cancelled`` for a job that started meanwhile).
    """
    if record.status.finished or not lifecycle.move(store, record, Status.CANCELLED,
                                                    reason=reason, only_from=only_from):
        return False
    if record.trigger == Trigger.AUTO:
        mark_cancelled(settings, store, record)
    log.warning("%s@%s: run %s cancelled: %s", record.app, record.sha[:7], record.id, reason)
    announce_end(settings, store, record)
    return True


def heed_request(store: StateStore, clock: JobClock, record: RunRecord) -> None:
    """A cancel written to Redis (`postdeploy cancel` on any host, Flower's revoke without
    terminate) while git worked: the job never starts. Once it runs, its guard watches."""
    if clock.cancel_reason is None:
        how = quietly(lambda: store.cancel_request(record.id))
        if how:
            clock.cancel(f"cancelled {how}")


def revoke_reason(store: StateStore, record: RunRecord) -> str | None:
    """SIGTERM stopped the job: the cancelled run's reason if a revoke did it, None if
    its worker is shutting down. The worker's main process records a revoke (see
    services/tasks.py) while the job stops, so its trace is waited for a moment."""
    deadline = time.monotonic() + REVOKE_WAIT
    while time.monotonic() < deadline:
        stored = quietly(lambda: store.get_run(record.id))
        if stored is not None and stored.status == Status.CANCELLED:
            return stored.reason
        how = quietly(lambda: store.cancel_request(record.id))
        if how:  # the revoke's request, written before it records the run
            return f"cancelled {how}"
        time.sleep(0.05)
    return None


def wait_stopped(store: StateStore, record: RunRecord, timeout: float,
                 on_progress: Callable[[float], None] = lambda _waited: None) -> Cancel:
    """Wait up to ``timeout`` seconds for a running run's worker to record its end."""
    started = time.monotonic()
    next_progress = started + PROGRESS_EVERY
    current = record
    while True:
        current = store.get_run(record.id) or current
        if current.status.finished:
            return Cancel(_result_of(current), current)
        now = time.monotonic()
        if now - started >= timeout:
            return Cancel(Result.STOPPING, current)
        if now >= next_progress:
            next_progress = now + PROGRESS_EVERY
            on_progress(now - started)
        time.sleep(POLL)


def cancel_and_report(settings: Settings, store: StateStore, record: RunRecord,
                      say: Callable[[str, bool], None]) -> bool:
    """`postdeploy cancel`: cancel ``record``, wait for a running job to stop, and say
    how it went through ``say(line, to_stderr)``; False when the run had already ended."""
    label = f"run {record.id} of {record.app}@{record.sha[:7]}"
    outcome = request_cancel(settings, store, record, cli_how())
    wait = stop_wait(settings)
    if outcome.result == Result.STOPPING:
        say(f"stopping {label} on {outcome.record.worker or 'its worker'} "
            "(SIGTERM, then SIGKILL after the grace)...", True)
        outcome = wait_stopped(store, outcome.record, wait,
                               lambda waited: say(f"  still stopping after {waited:.0f} s...",
                                                  True))
    final = outcome.record
    if outcome.result == Result.ENDED:
        say(f"run {final.id} already ended as {final.status}", False)
        return False
    if outcome.result == Result.STOPPING:
        say(f"{label} is still stopping after {wait:g} s; the cancel request stands "
            f"(see `postdeploy history {record.app}`)", False)
    else:
        say(f"cancelled {label}: {final.reason}", False)
    for other in other_unfinished(store, final):
        say(f"run {other.id} of {other.app}@{other.sha[:7]} is still {other.status}; "
            f"`postdeploy cancel {other.app} {other.id}` cancels it too", True)
    return True


def stop_wait(settings: Settings) -> float:
    """How long the CLI waits: SIGTERM, the grace, SIGKILL, and the worker's record."""
    return settings.kill_grace + STOP_MARGIN


def _result_of(record: RunRecord) -> Result:
    if record.status == Status.CANCELLED:
        return Result.CANCELLED
    return Result.ENDED if record.status.finished else Result.STOPPING


def _user() -> str:
    # getlogin names who logged in (also under sudo); it fails without a terminal.
    try:
        return os.getlogin()
    except OSError:
        pass
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:  # a uid without a name (containers)
        return str(os.getuid())
