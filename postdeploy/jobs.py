"""One run of an app's POST_DEPLOY job, from queued message to recorded outcome.

Once-per-commit and one-run-per-app are enforced here, inside the task, because
Flower, the CLI and broker redelivery all reach this code without passing the
commit check.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

import redis
from celery.exceptions import SoftTimeLimitExceeded

from postdeploy import placement, waiting
from postdeploy.appspec import APPSPEC_FILE, MAX_APPSPEC_BYTES, parse_appspec, resolve_folder
from postdeploy.config import Settings
from postdeploy.errors import AppSpecError, GitError, JobFailed
from postdeploy.gitsource import AppSource, is_sha
from postdeploy.notify import notify_if_needed
from postdeploy.output import OutputCapture
from postdeploy.placement import RunPlace, claim_ttl
from postdeploy.records import RunRecord, Status, Trigger
from postdeploy.redaction import mask_secrets
from postdeploy.runlock import RunLock
from postdeploy.runner import JobOutcome, kill_run_processes, run_command
from postdeploy.state import StateStore
from postdeploy.waiting import GateWait

log = logging.getLogger(__name__)

RENEW_EVERY = 0.25  # seconds between renewals of a running job's lock and claim
REDIS_PATIENCE = 120.0  # seconds a finished run waits for Redis to come back to record itself
HIDDEN_FROM_JOBS = ("POSTDEPLOY_", "FLOWER_")  # the executor's own settings, not the app's

T = TypeVar("T")


class LockBusy(Exception):
    """Another run of this app holds its lock; the task retries later."""


def execute_run(settings: Settings, store: StateStore, app_name: str, sha: str | None,
                trigger: str, run_id: str | None, worker: str | None = None,
                place: RunPlace | None = None, waiting_since: float | None = None
                ) -> RunRecord:
    """Run the job once if it should run; return its record.

    Raises LockBusy when the app is busy (retry later), GateWait when the app is
    not ready yet (re-queue), JobFailed when the run did not succeed (LENIENT:
    logged and recorded, never retried automatically).
    """
    place = place or RunPlace()
    app = settings.app(app_name)
    if app is None:
        raise JobFailed(f"unknown app {app_name!r}; it is not in this worker's configuration")
    if trigger not in (Trigger.AUTO.value, Trigger.MANUAL.value):
        raise JobFailed(f"invalid trigger {trigger!r}; use 'auto' or 'manual'")
    source = AppSource(app, settings.state_dir)
    if sha is None:
        sha = store.last_seen(app.name) or _current_sha(source)
    if not is_sha(sha):
        raise JobFailed(f"invalid sha {sha[:50]!r}; give a full 40-character commit id")

    record = store.get_run(run_id) if run_id else None
    if record is not None and record.status != Status.QUEUED.value:
        if Status(record.status).finished:
            log.info("run %s already ended as %s; ignoring a repeated message",
                     record.id, record.status)
            return record
    if record is None:
        record = RunRecord.new(app.name, sha, trigger)
        store.add_run(record)

    auto = trigger == Trigger.AUTO.value
    if auto and (skipped := placement.skip_reason(settings, store, app, sha, place)):
        return _finish(store, record, Status.SUPERSEDED, None, skipped, place)
    if (ended := _before_start(settings, store, source, record, place, waiting_since)):
        return ended

    lock = RunLock(store.client, place.lock_key(app.name), settings.lock_ttl * 1000)
    if not lock.acquire():
        raise LockBusy(app.name)
    try:
        lost = store.take_active(app.name, place.slot)
        if lost:
            _mark_lost(store, lost)
            notify_if_needed(settings, store, lost)  # NOTIFY HOOK (issue 11): run found lost
        if auto and (skipped := placement.skip_reason(settings, store, app, sha, place)):
            return _finish(store, record, Status.SUPERSEDED, None, skipped, place)
        current = store.get_run(record.id)
        if current is not None and current.status not in (Status.QUEUED.value,
                                                           Status.WAITING.value):
            # Redelivered after its worker died: that attempt is lost, this is a new one.
            record = RunRecord.new(app.name, sha, trigger)
            store.add_run(record)
        return _run_locked(settings, store, source, record, lock, worker, place)
    finally:
        _patiently(lock.release, "release the run lock")


def _before_start(settings: Settings, store: StateStore, source: AppSource, record: RunRecord,
                  place: RunPlace, waiting_since: float | None) -> RunRecord | None:
    """The right host, and a ready app: the run's record if it ends here, else None.

    Raises GateWait while the app's readiness gate does not pass yet.
    """
    auto = record.trigger == Trigger.AUTO.value
    if problem := placement.working_copy_problem(settings, source.app, record.sha):
        if auto:  # not ours to run, nor to mark done: a host that has the commit runs it
            placement.release_claim(store, record.app, record.sha, place)
            return _finish(store, record, Status.SUPERSEDED, None,
                           f"{problem}; left to a host that has it", place)
        return _finish(store, record, Status.ERROR, None,
                       f"{problem}; nothing was run (`postdeploy status` shows each host's "
                       "commit; pick one with --host)", place)
    try:
        verdict = waiting.look(settings, source, record.sha, waiting_since,
                               {"POST_DEPLOY_RUN_ID": record.id,
                                "POST_DEPLOY_TRIGGER": record.trigger})
    except (AppSpecError, GitError) as exc:
        return _end_auto(settings, store, record, Status.ERROR, str(exc), place)
    if verdict is None or verdict.ready:
        return None
    if verdict.timed_out:
        return _end_auto(settings, store, record, Status.FAILED, verdict.failed_reason, place)
    if record.status != Status.WAITING.value:
        log.info("%s@%s: waiting for the app to be ready (%s) before the job (run %s)",
                 record.app, record.sha[:7], verdict.url, record.id)
    record.status = Status.WAITING.value
    record.reason = verdict.waiting_reason
    record.host = settings.host
    store.save_run(record)
    # The claim stays while we wait, and lapses soon if this host goes away.
    store.client.set(place.claim_key(record.app, record.sha), settings.host,
                     ex=claim_ttl(settings.check_interval))
    raise GateWait(record.id, waiting.next_look(), verdict.since)


def _end_auto(settings: Settings, store: StateStore, record: RunRecord, status: Status,
              reason: str, place: RunPlace) -> RunRecord:
    finished = _finish(store, record, status, None, reason, place)
    notify_if_needed(settings, store, finished)  # a gate that failed, a bad appspec
    if record.trigger == Trigger.AUTO.value:
        placement.mark_done(settings, store, record.app, record.sha, record.id, place)
    return finished


def _run_locked(settings: Settings, store: StateStore, source: AppSource, record: RunRecord,
                lock: RunLock, worker: str | None, place: RunPlace) -> RunRecord:
    app = record.app
    store.set_active(app, record.id, place.slot)
    record.status = Status.RUNNING.value
    record.started_at = time.time()
    record.worker = worker or socket.gethostname()
    record.host = settings.host
    store.save_run(record)
    store.hold_claim(app, record.sha, settings.lock_ttl, place.slot)
    label = f"{app}@{record.sha[:7]}"
    secrets: frozenset[str] = frozenset()
    try:
        workdir, appspec_text = source.prepare(record.sha, APPSPEC_FILE, MAX_APPSPEC_BYTES)
        spec = parse_appspec(appspec_text, settings.environ)
        secrets = spec.secrets
        for warning in spec.warnings:
            log.warning("%s: %s", label, warning)
        if spec.command is None:
            raise AppSpecError("POST_DEPLOY_COMMAND is not set at this commit; "
                               "add it to appspec.yaml envs")
        cwd = resolve_folder(workdir, spec.folder)
        record.command = mask_secrets(spec.command, secrets)
        record.timeout = spec.timeout
        store.save_run(record)
        log.info("%s: POST_DEPLOY job started (run %s, %s trigger, timeout %d s): %s",
                 label, record.id, record.trigger, spec.timeout, record.command)
        outcome = _run_job_process(settings, store, record, lock, spec.command, cwd,
                                   _job_env(settings.environ, spec.env, record), spec.timeout,
                                   secrets, label, place)
    except (AppSpecError, GitError) as exc:
        outcome = JobOutcome(Status.ERROR, None, mask_secrets(str(exc), secrets))
    except SoftTimeLimitExceeded:
        outcome = JobOutcome(Status.TIMED_OUT, None, "timed out before the job started "
                             "(checkout took longer than POST_DEPLOY_TIMEOUT)")
    finished = _finish(store, record, outcome.status, outcome.exit_code, outcome.reason, place)
    notify_if_needed(settings, store, finished)  # NOTIFY HOOK (issue 11): the run's final status
    if record.trigger == Trigger.AUTO.value:
        _patiently(lambda: placement.mark_done(settings, store, app, record.sha, record.id,
                                               place), "mark the commit done")
    _patiently(lambda: store.clear_active(app, place.slot), "clear the active run")
    return finished


def _run_job_process(settings: Settings, store: StateStore, record: RunRecord, lock: RunLock,
                     command: str, cwd: Path, env: Mapping[str, str], timeout: int,
                     secrets: frozenset[str], label: str, place: RunPlace) -> JobOutcome:
    def store_output(tail: bytes, total: int) -> None:
        record.output_bytes = total
        _quietly(lambda: store.write_output(record.id, tail, total))

    capture = OutputCapture(label, settings.output_limit, secrets, store_output)
    # Renew often (one cheap Lua call): after a Redis restart that lost our keys, the
    # lock and claim are back at once, before a check could enqueue this commit again.
    renew_every = min(settings.lock_ttl / 3, RENEW_EVERY)
    next_renew = time.monotonic() + renew_every

    def tick() -> None:
        nonlocal next_renew
        capture.flush_if_due()
        if time.monotonic() >= next_renew:
            next_renew = time.monotonic() + renew_every
            if _quietly(lock.renew) is False:
                log.warning("%s: lost the run lock (Redis restarted?); finishing anyway", label)
                _quietly(lock.acquire)
            _quietly(lambda: store.hold_claim(record.app, record.sha, settings.lock_ttl,
                                              place.slot))

    outcome = run_command(command, cwd, env, timeout, settings.kill_grace,
                          record.id, capture.feed, tick)
    if outcome.status == Status.TIMED_OUT:
        capture.note(f"[postdeploy] {outcome.reason}; the job's processes were stopped")
    capture.close()
    return outcome


def _job_env(environ: Mapping[str, str], app_env: Mapping[str, str],
             record: RunRecord) -> dict[str, str]:
    env = {k: v for k, v in environ.items() if not k.startswith(HIDDEN_FROM_JOBS)}
    env.update(app_env)
    env.update({"COMMIT_SHA": record.sha, "POST_DEPLOY_APP": record.app,
                "POST_DEPLOY_RUN_ID": record.id, "POST_DEPLOY_TRIGGER": record.trigger})
    return env


def _finish(store: StateStore, record: RunRecord, status: Status, exit_code: int | None,
            reason: str | None, place: RunPlace) -> RunRecord:
    record.status = status.value
    record.exit_code = exit_code
    record.reason = reason
    record.finished_at = time.time()
    label = f"{record.app}@{record.sha[:7]}"
    _patiently(lambda: store.save_run(record), "record the run")
    if status == Status.SUCCEEDED:
        log.info("%s: POST_DEPLOY job succeeded in %.1f s (run %s)",
                 label, record.duration or 0.0, record.id)
    elif status == Status.SUPERSEDED:
        _patiently(lambda: placement.release_claim(store, record.app, record.sha, place),
                   "release the claim")
        log.info("%s: skipped (%s) (run %s)", label, reason, record.id)
    else:
        log.warning("%s: POST_DEPLOY job %s: %s (run %s); the app keeps running",
                    label, status.value, reason, record.id)
    return record


def _mark_lost(store: StateStore, run_id: str) -> None:
    record = store.get_run(run_id)
    if record is not None and not Status(record.status).finished:
        record.status = Status.LOST.value
        record.reason = "its worker stopped mid-run; the commit is run again"
        record.finished_at = time.time()
        store.save_run(record)
        log.warning("%s@%s: run %s was lost with its worker", record.app, record.sha[:7],
                    record.id)
    # Belt and braces for the runner's job guard: if the lost attempt's processes
    # still run on this host, stop them before the commit runs again (never two
    # copies of a job at once).
    if killed := kill_run_processes(run_id):
        log.warning("stopped %d leftover process(es) of lost run %s", killed, run_id)


def _current_sha(source: AppSource) -> str:
    try:
        return source.current_sha()
    except GitError as exc:
        raise JobFailed(str(exc)) from None


def _quietly(action: Callable[[], T]) -> T | None:
    """Best effort while the job runs: Redis trouble must not stop the job."""
    try:
        return action()
    except redis.RedisError as exc:
        log.debug("Redis unavailable during a run: %s", exc)
        return None


def _patiently(action: Callable[[], T], what: str) -> T:
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
