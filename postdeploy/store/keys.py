"""Every Redis key postdeploy uses, under one prefix.

The Celery broker and result backend are given the same prefix (through
kombu's ``global_keyprefix``), so one ``SCAN postdeploy:*`` sees everything.
"""

PREFIX = "postdeploy:"
# Celery's own keys (queues, unacked messages, task results) live below this.
CELERY_PREFIX = PREFIX + "celery:"

APPS = PREFIX + "apps"  # hash: app name -> JSON description (no credentials)
# Counters for metrics, kept in Redis so they survive restarts of the metrics process.
RUNS_TOTAL = PREFIX + "runs_total"  # hash: "app\ttrigger\tstatus" -> finished runs
NOTIFICATIONS_TOTAL = PREFIX + "notifications_total"  # hash: "sent"/"failed" -> count
# hash: "app\t<bucket bound>", "app\tcount", "app\tsum" -> the job durations histogram
RUN_DURATIONS = PREFIX + "run_durations"


def last_seen(app: str) -> str:
    """String: the commit the latest check saw for ``app``."""
    return f"{PREFIX}app:{app}:last_seen"


def checked_at(app: str) -> str:
    """String: Unix time of the latest successful commit check of ``app``."""
    return f"{PREFIX}app:{app}:checked_at"


def run_lock(app: str) -> str:
    """String with expiry: token of the worker running ``app``'s job now."""
    return f"{PREFIX}app:{app}:lock"


def fence_counter(lock_key: str) -> str:
    """Counter: the last fencing token issued for the run lock ``lock_key`` (only grows)."""
    return f"{lock_key}:fence"


def active_run(app: str) -> str:
    """String: id of the run holding the lock; left behind only by a lost run."""
    return f"{PREFIX}app:{app}:active"


def history(app: str) -> str:
    """List of run ids, newest first, capped."""
    return f"{PREFIX}app:{app}:history"


def deployments(app: str) -> str:
    """Hash: ``app``'s deployments: "seq" and "current" -> ids, id -> JSON (id, sha,
    previous_sha, at), "sha:<sha>" -> the latest id of that commit (see deployments.py)."""
    return f"{PREFIX}app:{app}:deployments"


def host_heads(app: str) -> str:
    """Hash: host -> the HEAD its working copy had at its last report (``path`` apps)."""
    return f"{PREFIX}app:{app}:heads"


def deployment_prefix(app: str) -> str:
    """Start of every key about one of ``app``'s deployments (the Lua scripts add the id)."""
    return f"{PREFIX}app:{app}:deployment:"


def done(app: str, deployment: int) -> str:
    """String: id of the automatic run that finished ``deployment`` (idempotency marker)."""
    return f"{deployment_prefix(app)}{deployment}:done"


def claim(app: str, deployment: int) -> str:
    """String with expiry: an automatic run of ``deployment`` is queued or running."""
    return f"{deployment_prefix(app)}{deployment}:claim"


def commit_done(app: str, sha: str) -> str:
    """String: the once-per-commit marker of versions before deployments; read once, at
    an app's first deployment, so an upgrade does not run the current commit again."""
    return f"{PREFIX}app:{app}:done:{sha}"


def decisions(app: str, sha: str) -> str:
    """List of JSON notes, capped, with expiry: decisions about ``app``@``sha`` for `why`."""
    return f"{PREFIX}app:{app}:why:{sha}"


def decision_once(app: str, sha: str, what: str) -> str:
    """String with expiry: the note ``what`` about ``app``@``sha`` was made (at most once)."""
    return f"{PREFIX}app:{app}:why:{sha}:once:{what}"


def run(run_id: str) -> str:
    """String: the JSON run record."""
    return f"{PREFIX}run:{run_id}"


def output(run_id: str) -> str:
    """String: the tail of the run's output, capped."""
    return f"{PREFIX}run:{run_id}:output"


def check_failure(app: str) -> str:
    """String (JSON): the current streak of failed checks: error, since, count, logged_at."""
    return f"{PREFIX}app:{app}:check_failure"


def check_errors(app: str) -> str:
    """Counter: failed commit checks of ``app`` (for metrics)."""
    return f"{PREFIX}app:{app}:check_errors"


def notified(run_id: str, event: str) -> str:
    """String with expiry: the notification of ``run_id``'s ``event`` was queued (at most once)."""
    return f"{PREFIX}run:{run_id}:notified:{event}"


def deployment_notified(app: str, deployment: int, event: str) -> str:
    """String with expiry: the one message about a scope-instance deployment's ``event``."""
    return f"{deployment_prefix(app)}{deployment}:notified:{event}"


def commit_status_sent(run_id: str) -> str:
    """String with expiry: 1 once ``run_id``'s pending commit status was sent, 2 its result."""
    return f"{PREFIX}run:{run_id}:commit_status"


def notify_failing(app: str) -> str:
    """String (JSON): the failed run ``app``'s last notification was about, until it recovers."""
    return f"{PREFIX}app:{app}:notify_failing"


def last_push(app: str) -> str:
    """String: Unix time the latest push webhook matching ``app`` arrived."""
    return f"{PREFIX}app:{app}:last_push"


def check_pending(app: str) -> str:
    """String with expiry: a push's check of ``app`` is queued and has not started yet."""
    return f"{PREFIX}app:{app}:check_pending"


def webhook_delivery(provider: str, delivery_id: str) -> str:
    """String with expiry: a webhook delivery already received (replays are ignored)."""
    return f"{PREFIX}webhook:delivery:{provider}:{delivery_id}"


def cancel(run_id: str) -> str:
    """String with expiry: who cancelled ``run_id`` and how; the job's guard stops it."""
    return f"{PREFIX}run:{run_id}:cancel"


def lost_attempts(app: str, deployment: int) -> str:
    """Counter with expiry: automatic attempts of ``deployment`` that died with their worker."""
    return f"{deployment_prefix(app)}{deployment}:lost"


# -- hosts and instances (an instance is one app on one host) ---------------------
def instances(app: str) -> str:
    """Hash: host -> JSON report of ``app`` on that host (sha, ready, boot, seen_at)."""
    return f"{PREFIX}app:{app}:instances"


def instance_done(app: str, host: str, boot_id: str, deployment: int) -> str:
    """String: id of the run that finished ``deployment`` on ``host`` in this boot
    (scope instance)."""
    return f"{PREFIX}app:{app}:host:{host}:boot:{boot_id}:deployment:{deployment}:done"


def instance_claim(app: str, host: str, deployment: int) -> str:
    """String with expiry: a run of ``deployment`` on ``host`` is queued, waiting or running."""
    return f"{PREFIX}app:{app}:host:{host}:deployment:{deployment}:claim"


def instance_lock(app: str, host: str) -> str:
    """String with expiry: the run holding ``app``'s instance on ``host`` now."""
    return f"{PREFIX}app:{app}:host:{host}:lock"


def instance_active(app: str, host: str) -> str:
    """String: id of the run holding ``app``'s instance lock on ``host`` (scope instance)."""
    return f"{PREFIX}app:{app}:host:{host}:active"
