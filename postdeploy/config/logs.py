"""Logging for the entry points (library modules only log)."""

from __future__ import annotations

import logging
import sys
from typing import Any

from celery import signals

FORMAT = "%(asctime)s %(levelname)-7s %(processName)s %(name)s: %(message)s"


def configure_logging(level: str) -> None:
    """One stderr handler for everything; Celery is told not to install its own."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    # Per-task and per-tick lines would drown the job lines (one pair per app every
    # interval); postdeploy logs what matters itself. DEBUG shows everything.
    quiet = logging.DEBUG if level == "DEBUG" else logging.WARNING
    for name in ("git", "urllib3", "tornado.access", "celery.app.trace",
                 "celery.worker.strategy", "celery.beat"):
        logging.getLogger(name).setLevel(quiet)
    signals.setup_logging.connect(_keep_our_logging, weak=False)


def _keep_our_logging(**_: Any) -> None:
    """Connected to Celery's setup_logging: its presence stops Celery configuring logs."""
