"""The commit check: a reconciliation, not an edge trigger.

For one app: learn the deployed commit (a ref lookup), store it as last seen,
and enqueue an automatic run when that commit has no finished run and none
queued or running. So the first check runs the job, a restart with the same
commit runs nothing, and a run lost with its worker is enqueued again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from postdeploy.appspec import APPSPEC_FILE, DEFAULT_TIMEOUT, MAX_APPSPEC_BYTES, parse_appspec
from postdeploy.config import AppConfig, Settings
from postdeploy.errors import AppSpecError, GitError
from postdeploy.gitsource import AppSource
from postdeploy.records import RunRecord, Trigger
from postdeploy.state import StateStore

log = logging.getLogger(__name__)

# (app, sha, trigger, run_id, timeout) -> None; puts a run_job message on the queue.
Enqueue = Callable[[str, str, str, str, int], None]


@dataclass(frozen=True)
class CheckResult:
    app: str
    sha: str | None
    action: str  # "unchanged", "enqueued", "no-command" or "error"
    detail: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        return {"app": self.app, "sha": self.sha, "action": self.action, "detail": self.detail}


def check_app(settings: Settings, store: StateStore, app: AppConfig,
              enqueue: Enqueue) -> CheckResult:
    source = AppSource(app, settings.state_dir)
    try:
        sha = source.current_sha()
    except GitError as exc:
        store.count_check_error(app.name)
        log.warning("commit check of %s failed: %s", app.name, exc)
        return CheckResult(app.name, None, "error", str(exc))

    if not store.observe(app.name, sha):
        log.debug("%s@%s: unchanged", app.name, sha[:7])
        return CheckResult(app.name, sha, "unchanged")

    timeout = DEFAULT_TIMEOUT
    try:
        text = source.read_file(sha, APPSPEC_FILE, MAX_APPSPEC_BYTES)
        spec = parse_appspec(text, settings.environ)
        if spec.command is None:
            log.info("%s@%s: POST_DEPLOY_COMMAND is not set; no job to run",
                     app.name, sha[:7])
            store.mark_done(app.name, sha, "no-command")
            return CheckResult(app.name, sha, "no-command")
        timeout = spec.timeout
    except (AppSpecError, GitError) as exc:
        # The run itself records the problem as `error`; it needs a queued run to do so.
        log.debug("%s@%s: appspec problem left to the run: %s", app.name, sha[:7], exc)

    record = RunRecord.new(app.name, sha, Trigger.AUTO.value)
    record.timeout = timeout
    store.add_run(record)
    try:
        enqueue(app.name, sha, Trigger.AUTO.value, record.id, timeout)
    except Exception:
        store.release_claim(app.name, sha)
        raise
    log.info("%s@%s: new commit, POST_DEPLOY job queued (run %s)", app.name, sha[:7], record.id)
    return CheckResult(app.name, sha, "enqueued", record.id)
