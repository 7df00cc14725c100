"""A run has its final status: tell the outside world, once (notifications, commit status)."""

from __future__ import annotations

from postdeploy.announce import commit_status
from postdeploy.announce.notify import notify_if_needed
from postdeploy.config.settings import Settings
from postdeploy.store.patience import quietly
from postdeploy.store.records import RunRecord
from postdeploy.store.state import StateStore


def announce_end(settings: Settings, store: StateStore, run: RunRecord | str) -> None:
    """Notifications (at most once per run and event) and the commit status. Never raises."""
    notify_if_needed(settings, store, run)
    record = quietly(lambda: store.get_run(run)) if isinstance(run, str) else run
    if record is not None:
        commit_status.report(settings, store, record)
