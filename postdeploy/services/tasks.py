"""Celery tasks, under the stable names Flower and scripts call."""

from __future__ import annotations

import logging
import random
import signal
from typing import Any

from celery import Task
from celery.exceptions import Ignore
from celery.signals import task_postrun, task_revoked
from celery.utils.functional import maybe_list
from celery.worker import control as worker_control
from celery.worker import state as worker_state

from postdeploy.errors import JobFailed
from postdeploy.run.cancel import request_cancel
from postdeploy.run.clock import JobClock
from postdeploy.run.gate import GateWait
from postdeploy.run.guard import reap_guards
from postdeploy.run.job import LockBusy, RunMessage, carry_out_run
from postdeploy.run.place import RunPlace
from postdeploy.source.appspec import SCOPE_APP
from postdeploy.store.celery_app import (
    UNSET_RUN_HARD_LIMIT,
    app,
    current_settings,
    enqueue_run,
    host_queue,
)
from postdeploy.store.connection import redis_client
from postdeploy.store.records import RunRecord, Status, Trigger
from postdeploy.store.state import StateStore
from postdeploy.trigger.check import reconcile, reconcile_all
from postdeploy.trigger.placement import HostPlacement, RunRequest, forward_host

log = logging.getLogger(__name__)

LOCK_RETRY_DELAY = 3.0  # seconds before a run waiting for its app's lock tries again
# Apps per check task: amortises Celery's per-task cost (about as much CPU as the
# ls-remote itself) while still spreading a large fleet over every worker.
CHECK_BATCH = 25

_store: StateStore | None = None


def state_store() -> StateStore:
    """This process's StateStore (created after fork, one connection pool per process)."""
    global _store
    if _store is None:
        settings = current_settings()
        _store = StateStore(redis_client(app.conf.broker_url), settings.history_limit)
    return _store


# The periodic checks send no task events: four events per check and interval
# would cost more CPU than the check itself and bury the job runs in Flower.
@app.task(name="postdeploy.check_commits", ignore_result=True, send_events=False)
def check_commits() -> None:
    """Check every app (beat calls this every interval); large fleets fan out in batches."""
    settings = current_settings()
    # A path app's commit is per host: each host's worker checks its own (host loop).
    names = [a.name for a in settings.apps if a.repo]
    if len(names) <= CHECK_BATCH:
        _check_batch(names)  # one task per cycle for a small fleet
        return
    for start in range(0, len(names), CHECK_BATCH):
        check_apps.apply_async(args=[names[start:start + CHECK_BATCH]],
                               expires=settings.check_interval)


@app.task(name="postdeploy.check_apps", ignore_result=True, send_events=False)
def check_apps(app_names: list[str]) -> None:
    """Check a batch of apps; one app's failure never stops the others."""
    _check_batch(app_names)


def _check_batch(app_names: list[str]) -> None:
    settings = current_settings()
    apps = []
    for name in app_names:
        if (app_config := settings.app(name)) is None:
            log.warning("check: unknown app %r (configurations differ between hosts?)", name)
        else:
            apps.append(app_config)
    reconcile_all(settings, state_store(), apps, _enqueue_auto)


@app.task(name="postdeploy.check_app")
def check_app(app_name: str) -> dict[str, str | None]:
    """Check one app's commit now; enqueue its job if its deployment has not run."""
    settings = current_settings()
    app_config = settings.app(app_name)
    if app_config is None:
        raise JobFailed(f"unknown app {app_name!r}")
    state_store().check_started(app_name)  # before git: a push from now on queues another
    if app_config.path:
        from postdeploy.trigger.instances import InstanceReporter

        # Checked here, as each host's loop does for its own working copy.
        reports = InstanceReporter(settings, state_store().client).report_once([app_config])
        queued = host_placement().reconcile(reports)
        sha = reports[0][1].sha if reports else None
        return {"app": app_name, "sha": sha, "action": "enqueued" if queued else "unchanged",
                "detail": queued[0].run_id if queued else None}
    result = reconcile(settings, state_store(), app_config, _enqueue_auto)
    return result.as_dict()


_placement: HostPlacement | None = None


def host_placement() -> HostPlacement:
    """This process's placement (claims it renews are its own runs)."""
    global _placement
    if _placement is None:
        from postdeploy.store.instances import InstanceRegistry
        from postdeploy.trigger.instances import LocalSpecs

        settings = current_settings()
        _placement = HostPlacement(settings, state_store(),
                                   InstanceRegistry(state_store().client),
                                   LocalSpecs(settings), enqueue_placed)
    return _placement


def enqueue_placed(request: RunRequest) -> None:
    """A run the host loop placed: on its host's own queue."""
    enqueue_run(request.app, request.sha, Trigger.AUTO.value, request.run_id, request.timeout,
                host=request.host, scope=request.scope)


def _enqueue_auto(app_name: str, sha: str, trigger: str, run_id: str, timeout: int) -> None:
    enqueue_run(app_name, sha, trigger, run_id, timeout)


@app.task(name="postdeploy.run_job", bind=True, throws=(JobFailed,), acks_late=True,
          time_limit=UNSET_RUN_HARD_LIMIT)
def run_job(self: Task, app: str, sha: str | None = None, trigger: str = "manual",
            run_id: str | None = None, host: str | None = None,
            scope: str | None = None, waiting_since: float | None = None) -> dict[str, Any]:
    """Run ``app``'s POST_DEPLOY job at ``sha`` (default: its last seen commit).

    Ends as FAILURE (JobFailed with the reason) unless the job succeeded or was
    skipped; failures are never retried automatically. The message's soft time
    limit, when it has one, is the job's deadline (see :mod:`postdeploy.run.clock`).
    """
    settings = current_settings()
    app_config = settings.app(app)
    if host is None and app_config is not None and app_config.path:
        # A path app's run sent to any host (Flower): to a host whose copy is at sha.
        sha = sha or state_store().last_seen(app)
        if sha is not None:
            host = forward_host(settings, state_store(), app_config, sha)
    if host is not None and host != settings.host:
        # Sent to the shared queue for one host (Flower): pass it on to that host.
        log.info("run of %s@%s forwarded to %s", app, (sha or "-")[:7], host)
        enqueue_run(app, sha, trigger, run_id, None, host=host, scope=scope)
        return {"run_id": run_id, "app": app, "sha": sha, "trigger": trigger,
                "status": "forwarded", "host": host}
    timelimit = self.request.timelimit or (None, None)
    try:
        with JobClock(soft_limit=timelimit[1]) as clock:
            message = RunMessage(app, sha, trigger, run_id, self.request.hostname,
                                 self.request.id, RunPlace(host, scope or SCOPE_APP),
                                 waiting_since)
            record = carry_out_run(settings, state_store(), clock, message)
    except LockBusy as busy:
        # Another run of this app is going on: wait our turn without holding a worker,
        # as the same run (a message sent without a run id got one on this attempt).
        raise self.retry(kwargs={**self.request.kwargs, "run_id": busy.run_id},
                         countdown=LOCK_RETRY_DELAY + random.random(), max_retries=None) from None
    except GateWait as wait:
        # The app is not ready: look again later, holding no worker process meanwhile.
        # Always this host's queue: the gate is about the app on the host that runs it.
        queue = host_queue(settings.host)
        raise self.retry(kwargs={**self.request.kwargs, "run_id": wait.run_id,
                                 "waiting_since": wait.since, "host": settings.host},
                         countdown=wait.countdown, max_retries=None, queue=queue) from None
    if clock.terminate_handled:
        # Revoked with terminate: Celery recorded the task as REVOKED; leave it so.
        raise Ignore()
    summary = {"run_id": record.id, "app": record.app, "sha": record.sha,
               "trigger": record.trigger, "status": record.status,
               "exit_code": record.exit_code, "reason": record.reason}
    if record.status not in (Status.SUCCEEDED, Status.SUPERSEDED):
        raise JobFailed(f"{record.app}@{record.sha[:7]} {record.status}: {record.reason}")
    return summary


@task_postrun.connect
def _after_run(sender: Any = None, **_: Any) -> None:
    """Reap the run's job guard once it has exited: after the result is sent, so the
    few ms its exit takes are nobody's wait (see GuardHandle.finish)."""
    if getattr(sender, "name", None) == run_job.name:
        reap_guards()


@task_revoked.connect
def _on_revoked(sender: Any = None, request: Any = None, terminated: bool = False,
                signum: Any = None, expired: bool = False, **_: Any) -> None:
    """A revoked run_job (Flower, `celery control revoke`) ends as cancelled, not queued.

    Runs in the worker's main process; a job still running is stopped by its pool
    process, which gets SIGTERM from Celery and sees the run cancelled here.
    """
    if getattr(sender, "name", None) != run_job.name or request is None:
        return
    kwargs = request.kwargs or {}
    try:
        record = _revoked_run(state_store(), kwargs.get("app"), kwargs.get("run_id"),
                              request.id)
        if record is None:
            return
        if expired:
            how = "expired before a worker took it"
        elif terminated:
            how = f"revoked from Flower (or celery control), terminated with {_name(signum)}"
        else:
            how = "revoked from Flower (or celery control) before it started"
        # As `postdeploy cancel`; with terminate, its job is being stopped already.
        request_cancel(current_settings(), state_store(), record, how, reason=how,
                       stopping=terminated)
    except Exception:  # a signal handler must never take the worker down
        log.exception("could not record the revoke of task %s", request.id)


REVOKED_RUNNING = "by a revoke from Flower (or celery control) while it ran"  # who and how
_celery_revoke = worker_control.Panel.data["revoke"]


@worker_control.control_command(name="revoke", variadic="task_id",
                                signature="[id1 [id2 [... [idN]]]]")
def _revoke_and_cancel(state: Any, task_id: Any, terminate: bool = False, signal: Any = None,
                       **kwargs: Any) -> Any:
    """Celery's revoke; without terminate it also cancels a run_job that is already running.

    Celery alone only keeps a revoked task from starting (and sends no task_revoked
    for one that runs), so the job would go on to its end. Its run gets a cancel
    request instead, and the pool process running it stops the job as for
    `postdeploy cancel`, staying alive. With terminate, _on_revoked does it.
    """
    answer = _celery_revoke(state, task_id, terminate=terminate, signal=signal, **kwargs)
    if not terminate:
        ids = set(maybe_list(task_id) or [])
        for request in list(worker_state.active_requests):
            if request.id in ids and request.task.name == run_job.name:
                _cancel_running(request)
    return answer


def _cancel_running(request: Any) -> None:
    kwargs = request.kwargs or {}
    try:
        store = state_store()
        record = _revoked_run(store, kwargs.get("app"), kwargs.get("run_id"), request.id)
        if record is None:
            log.warning("revoke of task %s: its run is not recorded yet; the job may go on",
                        request.id)
        elif not record.status.finished:
            request_cancel(current_settings(), store, record, REVOKED_RUNNING)
    except Exception:  # a control command must never take the worker down
        log.exception("could not cancel the run of revoked task %s", request.id)


def _revoked_run(store: StateStore, app_name: Any, run_id: Any,
                 task_id: str) -> RunRecord | None:
    if isinstance(run_id, str) and run_id:
        return store.get_run(run_id)
    if isinstance(app_name, str) and app_name:  # sent without a run id (Flower's API)
        return next((r for r in store.history(app_name) if r.task_id == task_id), None)
    return None


def _name(signum: Any) -> str:
    try:
        return signal.Signals(int(signum)).name
    except (TypeError, ValueError):
        return str(signum)


# -- notifications: all logic in postdeploy.announce.notify ---------------------------
NOTIFY_SOFT_LIMIT = 90  # seconds for one try of one message to every URL (each request <= 10 s)


@app.task(name="postdeploy.notify", bind=True, ignore_result=True, max_retries=None,
          acks_late=False,  # acknowledged on start: a crash mid-send never sends twice
          soft_time_limit=NOTIFY_SOFT_LIMIT, time_limit=NOTIFY_SOFT_LIMIT + 30)
def notify(self: Task, run_id: str, event: str, pending: list[str] | None = None,
           previous: str | None = None, deployment: int | None = None) -> None:
    """Send the message about ``run_id``'s ``event``; failed URLs are retried with backoff.

    The number of tries is bounded by postdeploy.announce.notify (NOTIFY_ATTEMPTS); a
    message that cannot be sent ends as a WARNING, never as a changed run.
    """
    # Imported here so this change stays at the end of the module.
    from postdeploy.announce.notify import NOTIFY_EXPIRES, deliver, retry_delay

    settings = current_settings()
    attempt = self.request.retries + 1
    failed = deliver(settings, state_store(), run_id, event, pending, attempt, previous,
                     deployment)
    if failed:
        raise self.retry(kwargs={"run_id": run_id, "event": event, "pending": failed,
                                 "previous": previous, "deployment": deployment},
                         countdown=retry_delay(settings, attempt), expires=NOTIFY_EXPIRES)


# -- commit statuses: all logic in postdeploy.announce.commit_status ----------------------------
@app.task(name="postdeploy.commit_status", bind=True, ignore_result=True, max_retries=None,
          acks_late=False, soft_time_limit=60, time_limit=90)
def commit_status(self: Task, run_id: str, status: str) -> None:
    """Report ``run_id``'s ``status`` to its git host; retried with backoff, a WARNING
    when it cannot be sent (bounded by postdeploy.announce.commit_status.ATTEMPTS)."""
    from postdeploy.announce.commit_status import EXPIRES, deliver, retry_delay

    settings = current_settings()
    attempt = self.request.retries + 1
    if deliver(settings, state_store(), run_id, status, attempt):
        raise self.retry(kwargs={"run_id": run_id, "status": status},
                         countdown=retry_delay(settings, attempt), expires=EXPIRES)
