"""One run of an app's POST_DEPLOY job, from queued message to recorded outcome.

Once-per-deployment and one-run-per-app are enforced here, inside the task, because
Flower, the CLI and broker redelivery all reach this code without passing the
commit check.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import redis
from celery.exceptions import SoftTimeLimitExceeded

from postdeploy.announce import commit_status
from postdeploy.announce.run_end import announce_end
from postdeploy.config.redaction import mask_secrets
from postdeploy.config.secrets import executor_secrets
from postdeploy.config.settings import Settings
from postdeploy.errors import AppSpecError, GitError, JobFailed, JobUserError
from postdeploy.run import gate as waiting
from postdeploy.run.cancel import cancel_run, heed_request, revoke_reason
from postdeploy.run.clock import JobClock
from postdeploy.run.env import run_environment
from postdeploy.run.gate import GateWait
from postdeploy.run.guard import Lease
from postdeploy.run.output import OutputCapture
from postdeploy.run.place import (
    RunPlace,
    claim_ttl,
    mark_done,
    skip_reason,
    working_copy_problem,
)
from postdeploy.run.runner import JobOutcome, kill_run_processes, run_process
from postdeploy.run.sandbox import JobPlace, place_job
from postdeploy.source.appspec import parse_appspec, resolve_folder
from postdeploy.source.git import AppSource, is_sha
from postdeploy.store import decisions, deployments, keys, lifecycle
from postdeploy.store.celery_app import app as celery
from postdeploy.store.deployments import Deployment
from postdeploy.store.fencing import Fence, RunLock
from postdeploy.store.patience import patiently, quietly
from postdeploy.store.records import RunRecord, Status, Trigger
from postdeploy.store.state import StateStore

log = logging.getLogger(__name__)

MAX_LOST_ATTEMPTS = 3  # automatic runs of one deployment that may die with their worker



class LockBusy(Exception):
    """Another run of this app holds its lock; the task retries later, as run ``run_id``."""

    def __init__(self, app: str, run_id: str) -> None:
        super().__init__(app)
        self.run_id = run_id


@dataclass(frozen=True)
class RunMessage:
    """One ``run_job`` message as its task received it."""

    app: str
    sha: str | None  # None: the app's last seen commit
    trigger: str
    run_id: str | None = None  # None: a message sent without a run (Flower, the API)
    worker: str | None = None  # the Celery worker's name
    task_id: str | None = None
    place: RunPlace = field(default_factory=RunPlace)
    waiting_since: float | None = None  # when its readiness wait began, on a retry


def carry_out_run(settings: Settings, store: StateStore, clock: JobClock,
                  message: RunMessage) -> RunRecord:
    """Carry out one requested run, if it should happen; return its record.

    Raises LockBusy when the app (or, scope instance, the instance) is busy and
    GateWait while the app is not ready yet (both: retry later), JobFailed when
    the message itself is wrong. A run that did not succeed is only recorded (LENIENT).
    """
    app_name, sha, trigger, run_place = message.app, message.sha, message.trigger, message.place
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

    record = store.get_run(message.run_id) if message.run_id else None
    if record is not None and record.status.finished:
        log.info("run %s already ended as %s; ignoring a repeated message",
                 record.id, record.status)
        return record
    if record is None or record.status == Status.RUNNING:
        # (Running: redelivered after its worker died. That attempt is lost when this
        # one takes the app's lock; this attempt is a new run.)
        # A message without a run (Flower, a redelivery) is of the latest deployment of
        # its commit: an automatic one of an older deployment is then superseded.
        record = lifecycle.new_run(store, app.name, sha, trigger,
                                   deployment=store.deployments.of_sha(app.name, sha))

    auto = record.trigger == Trigger.AUTO
    if auto and (skipped := skip_reason(settings, store, app, record, run_place)):
        return _finish(settings, store, record, JobOutcome(Status.SUPERSEDED, None, skipped),
                       run_place)
    if ended := _before_start(settings, store, source, record, run_place,
                              message.waiting_since):
        return ended

    lock = store.run_lock(app.name, settings.lock_ttl, run_place.slot)
    if not lock.acquire():
        raise LockBusy(app.name, record.id)
    fence = lock.fence()
    try:
        lost = store.take_active(app.name, run_place.slot)
        if lost:
            _mark_lost(settings, store, lost)
            announce_end(settings, store, lost)
        if auto and (skipped := skip_reason(settings, store, app, record, run_place)):
            return _finish(settings, store, record,
                           JobOutcome(Status.SUPERSEDED, None, skipped), run_place, fence)
        if auto and store.lost_attempts(app.name, record.deployment) >= MAX_LOST_ATTEMPTS:
            # A job that takes its worker down with it (OOM, `kill $PPID`) would
            # otherwise be run again for ever.
            return _finish(settings, store, record, JobOutcome(Status.ERROR, None, (
                f"its last {MAX_LOST_ATTEMPTS} runs died with their worker (lost); not run "
                f"again automatically: see `postdeploy logs {app.name}`, then "
                f"`postdeploy run {app.name}` by hand")), run_place, fence)
        current = store.get_run(record.id)
        if current is not None:  # it may have been cancelled while it waited
            record = current
        if record.status.finished:
            return record
        return _run_locked(settings, store, source, clock, record, lock, message)
    finally:
        patiently(lambda: _release(lock), "release the run lock")


def _before_start(settings: Settings, store: StateStore, source: AppSource, record: RunRecord,
                  run_place: RunPlace, waiting_since: float | None) -> RunRecord | None:
    """The right host, and a ready app: the run's record if it ends here, else None.

    Raises GateWait while the app's readiness gate does not pass yet.
    """
    auto = record.trigger == Trigger.AUTO
    if problem := working_copy_problem(settings, source.app, record.sha):
        if auto:  # not ours to run, nor to mark done: a host that has the commit runs it
            return _finish(settings, store, record, JobOutcome(
                Status.SUPERSEDED, None, f"{problem}; left to a host that has it"), run_place)
        return _finish(settings, store, record, JobOutcome(
            Status.ERROR, None, f"{problem}; nothing was run (`postdeploy status` shows each "
            "host's commit; pick one with --host)"), run_place)
    try:
        verdict = waiting.look(settings, source, record.sha, waiting_since,
                               {"POST_DEPLOY_RUN_ID": record.id,
                                "POST_DEPLOY_TRIGGER": record.trigger},
                               record.reason if record.status == Status.WAITING else None,
                               gated=record.gated)
    except (AppSpecError, GitError) as exc:
        return _finish(settings, store, record, JobOutcome(Status.ERROR, None, str(exc)),
                       run_place)
    if verdict is None or verdict.ready:
        return None
    if verdict.timed_out:
        return _finish(settings, store, record,
                       JobOutcome(Status.FAILED, None, verdict.failed_reason), run_place)
    first_look = record.status != Status.WAITING
    if first_look:
        log.info("%s@%s: waiting for the app to be ready (%s) before the job (run %s)",
                 record.app, record.sha[:7], verdict.url, record.id)
    if not lifecycle.move(store, record, Status.WAITING, reason=verdict.waiting_reason,
                          host=settings.host):
        return record  # cancelled meanwhile: it never starts
    if first_look:
        commit_status.report(settings, store, record)
        decisions.note(store.client, record.app, record.sha, f"run {record.id} waits for the "
                       f"app on {settings.host} to be ready: {verdict.waiting_reason}",
                       settings.host, record.id)
    # The claim stays while we wait, and lapses soon if this host goes away.
    if (claim := run_place.claim_key(record.app, record.deployment)) is not None:
        store.keep_claim(claim, settings.host, claim_ttl(settings.check_interval))
    raise GateWait(record.id, waiting.next_look(), verdict.since)


def _run_locked(settings: Settings, store: StateStore, source: AppSource, clock: JobClock,
                record: RunRecord, lock: RunLock, message: RunMessage) -> RunRecord:
    app, run_place = record.app, message.place
    fence = lock.fence()
    store.set_active(app, record.id, run_place.slot)
    if not lifecycle.move(store, record, Status.RUNNING, fence=fence,
                          worker=message.worker or socket.gethostname(),
                          task_id=message.task_id,
                          host=settings.host):
        # Cancelled (or otherwise ended) while it waited in the queue: it never starts.
        patiently(lambda: store.clear_active(app, run_place.slot), "clear the active run")
        return record
    commit_status.report(settings, store, record)
    store.hold_claim(app, record.deployment, settings.lock_ttl, run_place.slot)
    label = f"{app}@{record.sha[:7]}"
    secrets = frozenset(executor_secrets(settings, str(celery.conf.broker_url or "") or None))
    # The job's guard holds the run's lease until the run is recorded (the end of this
    # block), so a slow final write can never let the deployment run twice.
    with ExitStack() as lease_held:
        try:
            with clock.interruptible():
                workdir, appspec_text = source.prepare(record.sha)
            spec = parse_appspec(appspec_text, settings.environ)
            secrets = secrets | spec.secrets
            for warning in spec.warnings:
                log.warning("%s: %s", label, warning)
            if spec.command is None:
                raise AppSpecError("POST_DEPLOY_COMMAND is not set at this commit; "
                                   "add it to appspec.yaml envs")
            cwd = resolve_folder(workdir, spec.folder)
            clock.arm(spec.timeout)
            heed_request(store, clock, record)
            if not lifecycle.update(store, record, fence=fence,
                                    command=mask_secrets(spec.command, secrets),
                                    timeout=spec.timeout):
                # Ended meanwhile (cancelled while git worked): the job never starts.
                outcome = JobOutcome(record.status, record.exit_code, record.reason)
            elif (stop := clock.stop_request()) is not None:
                outcome = JobOutcome(stop.status, None, f"{stop.reason}, before the job started")
            else:
                log.info("%s: POST_DEPLOY job started (run %s, %s trigger, timeout %d s): %s",
                         label, record.id, record.trigger, spec.timeout, record.command)
                place = place_job(settings, record.app, workdir)
                job = Job(spec.command, place.inside(workdir, cwd),
                          run_environment(settings, spec.env, record, place), secrets, label)
                outcome = _run_job_process(settings, store, clock, record, lock, job,
                                           place, lease_held, run_place)
        except (AppSpecError, GitError, JobUserError) as exc:
            outcome = JobOutcome(Status.ERROR, None, mask_secrets(str(exc), secrets))
        except SoftTimeLimitExceeded:
            outcome = JobOutcome(Status.TIMED_OUT, None, f"{clock.timeout_reason()}, before "
                                 "the job started (the checkout took that long)")
        if outcome.status == Status.CANCELLED and clock.terminated:
            # SIGTERM stopped the job: a revoke (the worker's main process cancels the
            # run), or the worker shutting down (lost: its deployment is run again).
            if (reason := revoke_reason(store, record)) is not None:
                clock.terminate_handled = True  # the pool process lives on
                outcome = JobOutcome(Status.CANCELLED, outcome.exit_code, reason)
            else:
                outcome = JobOutcome(Status.LOST, outcome.exit_code,
                                     _lost_reason(record, "its worker was shut down mid-run"))
        return _finish(settings, store, record, outcome, run_place, fence)


@dataclass(frozen=True)
class Job:
    """What to run for one run, once the appspec is read."""

    command: str
    cwd: Path
    env: dict[str, str]
    secrets: frozenset[str]
    label: str


def _run_job_process(settings: Settings, store: StateStore, clock: JobClock, record: RunRecord,
                     lock: RunLock, job: Job, place: JobPlace,
                     lease_held: ExitStack, run_place: RunPlace) -> JobOutcome:
    def store_output(tail: bytes, total: int) -> None:
        record.output_bytes = total
        quietly(lambda: store.write_output(record.id, tail, total, lock.fence()))

    capture = OutputCapture(job.label, settings.output_limit, job.secrets, store_output)
    # Scope instance: the instance's lock and claim, not the app's.
    lease = Lease(connect=store.guard_client, lock_key=lock.key,
                  token=lock.token or "", ttl=float(settings.lock_ttl),
                  claim_key=run_place.claim_key(record.app, record.deployment),
                  cancel_key=keys.cancel(record.id), restore=_deployment_restorer(record))
    outcome = lease_held.enter_context(run_process(
        job.command, job.cwd, job.env, settings.kill_grace, record.id, capture.feed,
        capture.flush_if_due, clock.stop_request, lease, place.sandbox))
    if outcome.status in (Status.TIMED_OUT, Status.CANCELLED, Status.LOST):
        capture.note(f"[postdeploy] {outcome.reason}; the job's processes were stopped")
    capture.close()
    return outcome


def _deployment_restorer(record: RunRecord) -> Callable[[redis.Redis], object] | None:
    """For the guard: put the run's deployment back should Redis lose its data."""
    if record.deployment is None:
        return None
    deployment = Deployment(record.deployment, record.sha, record.previous_sha,
                            record.queued_at or time.time())
    return lambda client: deployments.restore(client, record.app, deployment)


def _finish(settings: Settings, store: StateStore, record: RunRecord,
            outcome: JobOutcome, run_place: RunPlace, fence: Fence | None = None) -> RunRecord:
    """Record the outcome (unless the run ended otherwise meanwhile) and tidy up.

    ``fence``: the run lock's token while it is held; once another run holds the
    lock, the outcome is not recorded and nothing is tidied (that run owns the app).
    """
    status = outcome.status
    label = f"{record.app}@{record.sha[:7]}"
    moved = patiently(lambda: lifecycle.move(store, record, status, fence=fence,
                                              exit_code=outcome.exit_code,
                                              reason=outcome.reason), "record the run")
    if not record.status.finished:
        return record  # fenced off: another run holds the lock and will settle this one
    if moved and status == Status.SUCCEEDED:
        log.info("%s: POST_DEPLOY job succeeded in %.1f s (run %s)",
                 label, record.duration or 0.0, record.id)
    elif moved and status == Status.SUPERSEDED:
        log.info("%s: skipped (%s) (run %s)", label, outcome.reason, record.id)
    elif moved:
        log.warning("%s: POST_DEPLOY job %s: %s (run %s); the app keeps running",
                    label, status, outcome.reason, record.id)
    if moved:
        announce_end(settings, store, record)
    slot = run_place.slot
    deployment = record.deployment
    if record.status == Status.SUPERSEDED:
        patiently(lambda: store.release_claim(record.app, deployment, slot),
                   "release the claim")
        return record
    if record.status == Status.LOST:
        if moved and record.trigger == Trigger.AUTO:
            quietly(lambda: store.count_lost(record.app, deployment))
        if moved:  # our own worker's shutdown: let the next check enqueue it again
            patiently(lambda: store.release_claim(record.app, deployment, slot),
                       "release the claim")
            patiently(lambda: store.clear_active(record.app, slot), "clear the active run")
        return record  # else declared lost by another worker, whose run owns the app now
    if record.trigger == Trigger.AUTO and deployment is not None:
        patiently(lambda: mark_done(settings, store, record.app, deployment,
                                               record.id, run_place),
                   "mark the deployment done")
    patiently(lambda: store.clear_active(record.app, slot), "clear the active run")
    return record


def _mark_lost(settings: Settings, store: StateStore, run_id: str) -> None:
    record = store.get_run(run_id)
    cancel = store.cancel_request(run_id) if record is not None else None
    if record is not None and cancel:
        # Cancelled while its worker was dying: keep the operator's word (and, for an
        # automatic run, its deployment is not run again).
        cancel_run(settings, store, record, f"cancelled {cancel} (its worker had stopped "
                   "mid-run)")
    elif record is not None and not record.status.finished and lifecycle.move(
            store, record, Status.LOST, reason=_lost_reason(record, "its worker stopped mid-run")):
        log.warning("%s@%s: run %s was lost with its worker", record.app, record.sha[:7],
                    record.id)
        if record.trigger == Trigger.AUTO:
            store.count_lost(record.app, record.deployment)
    # Belt and braces for the runner's job guard: if the lost attempt's processes
    # still run on this host, stop them before the deployment runs again (never two
    # copies of a job at once).
    if killed := kill_run_processes(run_id):
        log.warning("stopped %d leftover process(es) of lost run %s", killed, run_id)


def _lost_reason(record: RunRecord, what: str) -> str:
    if record.trigger == Trigger.AUTO:
        return f"{what}; the deployment is run again"
    return f"{what}; start it again by hand if it is still needed"


def _current_sha(source: AppSource) -> str:
    try:
        return source.current_sha()
    except GitError as exc:
        raise JobFailed(str(exc)) from None


def _release(lock: RunLock) -> None:
    lock.release()  # (False: it lapsed, maybe retaken: nothing of ours to release)
