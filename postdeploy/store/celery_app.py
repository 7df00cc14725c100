"""The Celery application: JSON only, settings fit for long jobs, our key prefix.

Entry points call :func:`configure` with their Settings before starting Celery;
tasks reach the same Settings through :func:`current_settings`.
"""

from __future__ import annotations

from typing import Any

import redis
from celery import Celery
from celery.app.amqp import AMQP
from kombu.transport.redis import Channel as RedisChannel

from postdeploy.config.settings import MAX_TIMEOUT, Settings
from postdeploy.store import keys

QUEUE = "postdeploy"
RUN_JOB = "postdeploy.run_job"  # the job task's name (stable: Flower and scripts use it)
HOST_QUEUE_PREFIX = "postdeploy.host."  # each worker also consumes its host's own queue
HARD_LIMIT_MARGIN = 30  # seconds above soft limit + kill grace before Celery kills the task
# Hard limit of a run sent without limits (Flower's async-apply): its deadline comes from
# the appspec in the worker (see jobclock.py); this only bounds a pool process that hangs.
UNSET_RUN_HARD_LIMIT = MAX_TIMEOUT + 600 + HARD_LIMIT_MARGIN
# Redelivery of an unacknowledged job must never start while it may still be running.
VISIBILITY_TIMEOUT = MAX_TIMEOUT + 3_600



class QuietChecksAMQP(AMQP):  # type: ignore[misc]  # Celery is untyped
    """Celery's messaging, except that a task sending no events sends no task-sent event.

    task_send_sent_event is one switch for every task. Flower should see run_job
    queued, but a task-sent event of the periodic check, with no started or
    finished event after it (the check has send_events=False), stays a PENDING
    row in Flower's task list for ever, one per interval.
    """

    def as_task_v2(self, task_id: str, name: str, *args: Any, **kwargs: Any) -> Any:
        message = super().as_task_v2(task_id, name, *args, **kwargs)
        task = self.app.tasks.get(name)
        if message.sent_event is not None and task is not None and not task.send_events:
            return message._replace(sent_event=None)
        return message


app = Celery("postdeploy", include=["postdeploy.services.tasks"], amqp=QuietChecksAMQP)
_settings: Settings | None = None


def configure(settings: Settings, redis_url: str) -> Celery:
    """Point the app at ``redis_url`` and apply postdeploy's Celery settings."""
    global _settings
    _settings = settings
    _guard_closed_broker_channels()
    app.conf.update(
        broker_url=redis_url,
        result_backend=redis_url,
        broker_transport_options={"global_keyprefix": keys.CELERY_PREFIX,
                                  "visibility_timeout": VISIBILITY_TIMEOUT},
        result_backend_transport_options={"global_keyprefix": keys.CELERY_PREFIX},
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # keep trying while Redis is down
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],  # pickle is refused, never deserialised
        result_accept_content=["json"],
        task_default_queue=QUEUE,
        task_acks_late=True,  # a job whose worker dies is not acknowledged
        # ...and the check loop, not a redelivery loop, runs it again.
        task_reject_on_worker_lost=False,
        worker_prefetch_multiplier=1,  # a long job never holds other jobs hostage
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_track_started=True,
        result_expires=7 * 86_400,
        result_extended=True,  # Flower shows args of finished tasks
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_concurrency=settings.concurrency,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        beat_schedule={
            "check-commits": {
                "task": "postdeploy.check_commits",
                "schedule": settings.check_interval,
                # A check queued while no worker ran is stale by the next one.
                "options": {"expires": settings.check_interval},
            },
        },
        timezone="UTC",
    )
    return app


def host_queue(host: str) -> str:
    """The queue only ``host``'s workers consume: runs that must happen on that host."""
    return HOST_QUEUE_PREFIX + host


def current_settings() -> Settings:
    if _settings is None:
        raise RuntimeError("postdeploy.store.celery_app.configure() was not called")
    return _settings


def hard_limit(timeout: int, kill_grace: float) -> int:
    """Celery's hard time limit: above the soft limit plus the SIGTERM grace."""
    return int(timeout + kill_grace + HARD_LIMIT_MARGIN)


def enqueue_run(app_name: str, sha: str | None, trigger: str, run_id: str | None,
                timeout: int | None, host: str | None = None, scope: str | None = None) -> str:
    """Put a run_job message on the queue; the soft time limit is the app's timeout.

    With ``host``, on that host's own queue (only its workers take it).
    """
    options: dict[str, Any] = {}
    if timeout:
        options = {"soft_time_limit": timeout,
                   "time_limit": hard_limit(timeout, current_settings().kill_grace)}
    kwargs: dict[str, Any] = {"app": app_name, "sha": sha, "trigger": trigger, "run_id": run_id}
    if host is not None:
        options["queue"] = host_queue(host)
        kwargs.update({"host": host, "scope": scope})
    result = app.send_task(RUN_JOB, kwargs=kwargs, **options)
    return str(result.id)


def _guard_closed_broker_channels() -> None:
    """Work around a worker crash when Redis goes away while a job runs (Celery 5.7).

    After a lost connection Celery's consumer first drops the transport
    (``Connection.collect``) and then closes the old channel, which puts the
    unacknowledged messages back, or later acks the job that finished meanwhile,
    through a transport without connection details: an AttributeError kombu does
    not expect, and the worker stops ("Unrecoverable error"). Raising a connection
    error instead lets kombu carry on as for any broker failure. Those messages
    stay in Redis' unacked set; postdeploy never needs them back (the commit check
    re-enqueues a lost run, and a repeated message of a finished run is ignored).
    Found by tests/faults/test_redis_faults.py.
    """
    original: Any = RedisChannel._connparams
    if getattr(original, "postdeploy_guard", False):
        return

    def _connparams(self: Any, asynchronous: bool = False) -> Any:
        if self.connection.client is None:
            raise redis.ConnectionError("broker connection already closed")
        return original(self, asynchronous)

    _connparams.postdeploy_guard = True  # type: ignore[attr-defined]
    setattr(RedisChannel, "_connparams", _connparams)  # noqa: B010 (mypy: method-assign)
