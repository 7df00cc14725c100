"""The commit check: a reconciliation, not an edge trigger.

For one app: learn the deployed commit (a ref lookup); when it differs from the
last seen one, record a deployment (see :mod:`postdeploy.store.deployments`); enqueue
an automatic run when the current deployment has no finished run and none
queued or running. So the first check runs the job, a restart with the same
commit runs nothing, a rollback runs it again, and a run lost with its worker
is enqueued again.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from postdeploy.config.settings import AppConfig, Settings
from postdeploy.errors import AppSpecError, GitError
from postdeploy.source.appspec import DEFAULT_TIMEOUT, SCOPE_INSTANCE, parse_appspec
from postdeploy.source.git import AppSource
from postdeploy.store import decisions
from postdeploy.store.deployments import Observation
from postdeploy.store.lifecycle import new_run
from postdeploy.store.records import Trigger
from postdeploy.store.state import INSTANCE_SCOPE_MARK, NO_COMMAND_MARK, StateStore
from postdeploy.trigger.placement import retire_stale

log = logging.getLogger(__name__)

FAILURE_LOG_EVERY = 600.0  # seconds between WARNINGs while an app's check keeps failing
STALE_LOOKS = 2  # git lookups of one check when another check raced it (then the next decides)

# (app, sha, trigger, run_id, timeout) -> None; puts a run_job message on the queue.
Enqueue = Callable[[str, str, str, str, int], None]


def _streak_text(streak: dict[str, Any]) -> str:
    if streak["count"] == 1:
        return "no run until it works; reported again every 10 min while it fails"
    minutes = (time.time() - streak["since"]) / 60
    return f"still failing: {streak['count']} checks over {minutes:.0f} min"


class _Unread:
    """The current deployment was not read ahead: the check reads it itself."""


UNREAD = _Unread()


def _look(store: StateStore, source: AppSource, app: AppConfig,
          seen_before: int | None | _Unread) -> Observation:
    """Learn the branch head and record it (a deployment if it changed).

    The current deployment is read before git (by the caller, for a batch of
    apps in one round trip): when another check records one while git runs,
    this answer may predate it and records nothing. Git is then asked once more,
    so a push's check never leaves its commit to the next interval.
    """
    for _ in range(STALE_LOOKS):
        if isinstance(seen_before, _Unread):
            seen_before = store.deployments.current_id(app.name)
        seen = store.observe(app.name, source.current_sha(), seen_before)
        seen_before = UNREAD
        if not seen.stale:
            break
        log.debug("%s: deployment %d (%s) was recorded while this check looked; looking "
                  "again", app.name, seen.deployment.id, seen.deployment.sha[:7])
    return seen


@dataclass(frozen=True)
class CheckResult:
    app: str
    sha: str | None
    action: str  # "unchanged", "enqueued", "no-command", "per-instance" or "error"
    detail: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        return {"app": self.app, "sha": self.sha, "action": self.action, "detail": self.detail}


def reconcile_all(settings: Settings, store: StateStore, apps: list[AppConfig],
                  enqueue: Enqueue) -> None:
    """:func:`reconcile` each app, their current deployments read in one round trip;
    one app's failure never stops the others."""
    before = store.deployments.current_ids([app.name for app in apps])
    for app, seen_before in zip(apps, before, strict=True):
        try:
            reconcile(settings, store, app, enqueue, seen_before)
        except Exception:
            log.exception("check of %s failed unexpectedly", app.name)


def reconcile(settings: Settings, store: StateStore, app: AppConfig, enqueue: Enqueue,
              seen_before: int | None | _Unread = UNREAD) -> CheckResult:
    """Check one app's deployed commit; enqueue an automatic run if its deployment has none.

    ``seen_before``: the app's current deployment id, read just before (see _look).
    """
    source = AppSource(app, settings.state_dir)
    try:
        seen = _look(store, source, app, seen_before)
    except GitError as exc:
        streak = store.check_failed(app.name, str(exc), FAILURE_LOG_EVERY)
        if streak is not None:
            log.warning("commit check of %s failed: %s (%s)", app.name, exc,
                        _streak_text(streak))
        return CheckResult(app.name, None, "error", str(exc))
    if seen.recovered is not None:
        log.info("commit check of %s works again after %d failed check(s)", app.name,
                 json.loads(seen.recovered)["count"])

    deployment = seen.deployment
    sha = deployment.sha
    if seen.started:
        log.info("%s: deployment %d: %s (was %s)", app.name, deployment.id, sha[:7],
                 (deployment.previous_sha or "-")[:7])
        decisions.note(store.client, app.name, sha, f"the commit check on {settings.host} "
                       f"found {app.branch or 'the branch'} at this commit", settings.host)
    if not seen.claimed:
        log.debug("%s@%s: unchanged", app.name, sha[:7])
        return CheckResult(app.name, sha, "unchanged")

    timeout = DEFAULT_TIMEOUT
    gated: bool | None = None  # unknown: the run reads the appspec for its gate itself
    try:
        text = source.read_appspec(sha, fetch="first" if seen.started else "if-missing")
        spec = parse_appspec(text, settings.environ)
        if spec.command is None:
            log.info("%s@%s: POST_DEPLOY_COMMAND is not set; no job to run",
                     app.name, sha[:7])
            store.mark_done(app.name, deployment.id, NO_COMMAND_MARK)
            return CheckResult(app.name, sha, "no-command")
        if spec.scope == SCOPE_INSTANCE:
            # Each host's loop runs it for its own instance (see postdeploy.trigger.placement).
            store.mark_done(app.name, deployment.id, INSTANCE_SCOPE_MARK)
            log.info("%s@%s: new deployment, POST_DEPLOY job runs on every instance",
                     app.name, sha[:7])
            return CheckResult(app.name, sha, "per-instance")
        timeout = spec.timeout
        gated = spec.gate is not None
    except (AppSpecError, GitError) as exc:
        # The run itself records the problem as `error`; it needs a queued run to do so.
        log.debug("%s@%s: appspec problem left to the run: %s", app.name, sha[:7], exc)

    retire_stale(store, app.name, deployment.id)  # a run a vanished worker held, if any
    record = new_run(store, app.name, sha, Trigger.AUTO, timeout, deployment, gated=gated)
    try:
        enqueue(app.name, sha, Trigger.AUTO.value, record.id, timeout)
    except Exception:
        store.release_claim(app.name, deployment.id)
        raise
    log.info("%s@%s: deployment %d, POST_DEPLOY job queued (run %s)", app.name, sha[:7],
             deployment.id, record.id)
    return CheckResult(app.name, sha, "enqueued", record.id)
