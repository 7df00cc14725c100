"""Starting the long-running processes: settings checked first, then Celery."""

from __future__ import annotations

import logging
import os
import socket
import time
import warnings
from collections.abc import Sequence
from typing import Any

from celery import signals

from postdeploy.config.checks import make_state_dir
from postdeploy.config.logs import configure_logging
from postdeploy.config.redaction import redact_url
from postdeploy.config.settings import Settings
from postdeploy.errors import ConfigError, RedisUnavailable
from postdeploy.run.sandbox import (
    check_job_user_setting,
    describe_isolation,
    lock_down_state_dir,
    prepare_job_root,
)
from postdeploy.run.user import check_app_users
from postdeploy.store.celery_app import QUEUE, app, configure, host_queue
from postdeploy.store.connection import redis_client, resolve_redis_url
from postdeploy.store.state import StateStore

log = logging.getLogger(__name__)

OUTAGE_REPORT_EVERY = 60.0  # seconds between beat's reports that it cannot reach Redis


def prepare(settings: Settings, need_apps: bool = True) -> str:
    """Check what a long-running process needs, then configure logging and Celery.

    Returns the Redis URL. Anything wrong is a ConfigError, which the CLI's main
    turns into one line and exit 2 for every entry point.
    """
    if need_apps and not settings.apps:
        raise ConfigError("no apps to watch; set POSTDEPLOY_REPO, or list apps in "
                          "postdeploy.yaml (POSTDEPLOY_CONFIG)")
    try:
        url = resolve_redis_url(settings)
    except RedisUnavailable as exc:
        raise ConfigError(str(exc)) from None  # nothing to start without Redis: a setting
    configure_logging(settings.log_level)
    # Celery warns about worker_cancel_long_running_tasks_on_connection_loss on every
    # lost connection although we set it on purpose (False: a job outlives a Redis blip).
    warnings.filterwarnings(
        "ignore", message=r"(?s).*worker_cancel_long_running_tasks_on_connection_loss")
    configure(settings, url)
    return url


def check_listen(address: str, port: int) -> None:
    """ConfigError now if ``address:port`` cannot be served, not a traceback later."""
    try:
        infos = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)
        family, kind, proto, _, where = infos[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(where)
    except (OSError, UnicodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(f"cannot listen on {address}:{port} ({reason}); "
                          "pick another --address or --port") from None


class BrokerOutageFilter(logging.Filter):
    """Keeps beat's log readable while Redis is down.

    Celery beat logs a full traceback and stack every tick it cannot publish (every
    second with a short interval). Keep one line when the outage starts and then one
    per ``every`` seconds with the count of failed ticks; found by the fault suite
    (tests/faults/test_redis_faults.py).
    """

    def __init__(self, every: float = OUTAGE_REPORT_EVERY) -> None:
        super().__init__()
        self.every = every
        self.last: float | None = None
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Message Error"):
            return True
        now = time.monotonic()
        if self.last is not None and now - self.last < self.every:
            self.suppressed += 1
            return False
        self.last = now
        reason = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        record.msg = ("cannot queue the commit check (Redis unavailable?): %s; "
                      "retrying every tick, %d failed since the last report")
        record.args = (reason, self.suppressed)
        record.exc_info = record.exc_text = None
        self.suppressed = 0
        return True


def _register_apps(settings: Settings) -> None:
    StateStore(redis_client(app.conf.broker_url)).register_apps(settings.apps)


def run_worker(settings: Settings, argv: Sequence[str] = ()) -> None:
    make_state_dir(settings.state_dir)  # checkouts live there
    # A wrong POSTDEPLOY_JOB_USER or app user stops the worker now, in one line.
    check_job_user_setting(settings)
    check_app_users(settings)
    prepare(settings)
    lock_down_state_dir(settings.state_dir)
    prepare_job_root()
    # Root is how the worker switches every job to the job user; Celery's warning about
    # it (meant for tasks that run as root) would say the opposite of what happens.
    warnings.filterwarnings("ignore", message=r"(?s).*running the worker with superuser")

    def _ready(**_: Any) -> None:
        _register_apps(settings)
        level, how = describe_isolation(settings)  # once, when Celery took its flags
        log.log(level, "%s", how)
        _start_reports(settings)

    signals.worker_ready.connect(_ready, weak=False)

    # No gossip or mingle: postdeploy coordinates through its own Redis keys, and
    # Celery 5.7's Gossip step fails to restart after a lost Redis connection
    # (AttributeError with a traceback on every reconnect).
    app.worker_main(["worker", "--loglevel", settings.log_level, "--pool", "prefork",
                     "--concurrency", str(settings.concurrency), "--task-events",
                     "--without-gossip", "--without-mingle",
                     "--hostname", f"postdeploy-{os.getpid()}@{settings.host}",
                     # The shared queue, and this host's own: runs that must happen here.
                     "--queues", f"{QUEUE},{host_queue(settings.host)}", *argv])


def _start_reports(settings: Settings) -> None:
    """This host's instance reports: now, then every check interval, until shutdown."""
    from postdeploy.services.tasks import host_placement
    from postdeploy.trigger.instances import HostLoop, InstanceReporter, ReadinessWatch

    placement = host_placement()
    probes = ReadinessWatch()
    loop = HostLoop(InstanceReporter(settings, placement.client, placement.specs, probes),
                    settings.check_interval, placement.reconcile).start()

    def stop(**_: Any) -> None:
        loop.stop()
        probes.close()

    signals.worker_shutdown.connect(stop, weak=False)


def run_beat(settings: Settings, argv: Sequence[str] = ()) -> None:
    prepare(settings)

    def _first_check(**_: Any) -> None:
        # Logged here, once Celery has accepted its flags: a bad one is then the only line.
        log.info(
            "beat: checking %d app(s) every %g s on %s", len(settings.apps),
            settings.check_interval, redact_url(str(app.conf.broker_url)))
        # The first check happens at start-up, not one interval later.
        _register_apps(settings)
        app.send_task("postdeploy.check_commits", expires=settings.check_interval)

    signals.beat_init.connect(_first_check, weak=False)
    logging.getLogger("celery.beat").addFilter(BrokerOutageFilter())
    app.start(["beat", "--loglevel", settings.log_level,
               "--scheduler", "celery.beat:Scheduler", *argv])
