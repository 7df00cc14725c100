"""Starting the long-running processes: settings checked first, then Celery."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from celery import signals

from postdeploy.celery_app import app, configure
from postdeploy.config import Settings
from postdeploy.connection import redis_client, resolve_redis_url
from postdeploy.errors import ConfigError, PostdeployError
from postdeploy.logconfig import configure_logging
from postdeploy.redaction import redact_url
from postdeploy.state import StateStore

log = logging.getLogger(__name__)


def prepare(role: str) -> Settings:
    """Load and check settings; on a bad one print one line and exit 2 (no traceback)."""
    try:
        settings = Settings.load()
        if not settings.apps:
            raise ConfigError("no apps to watch; set POSTDEPLOY_REPO, or list apps in "
                              "postdeploy.yaml (POSTDEPLOY_CONFIG)")
        url = resolve_redis_url(settings)
    except PostdeployError as exc:
        print(f"postdeploy {role}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(settings.log_level)
    configure(settings, url)
    return settings


def _register_apps(settings: Settings) -> None:
    StateStore(redis_client(app.conf.broker_url)).register_apps(settings.apps)


def run_worker(argv: Sequence[str] = ()) -> None:
    settings = prepare("worker")

    def _ready(**_: Any) -> None:
        _register_apps(settings)

    signals.worker_ready.connect(_ready, weak=False)

    app.worker_main(["worker", "--loglevel", settings.log_level, "--pool", "prefork",
                     "--concurrency", str(settings.concurrency), "--task-events",
                     "--hostname", f"postdeploy-{os.getpid()}@%h", *argv])


def run_beat(argv: Sequence[str] = ()) -> None:
    settings = prepare("beat")

    def _first_check(**_: Any) -> None:
        # The first check happens at start-up, not one interval later.
        _register_apps(settings)
        app.send_task("postdeploy.check_commits", expires=settings.check_interval)

    signals.beat_init.connect(_first_check, weak=False)
    log.info(
        "beat: checking %d app(s) every %g s on %s", len(settings.apps),
        settings.check_interval, redact_url(str(app.conf.broker_url)))
    app.start(["beat", "--loglevel", settings.log_level,
               "--scheduler", "celery.beat:Scheduler", *argv])
