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


def done(app: str, sha: str) -> str:
    """String: id of the automatic run that finished ``sha`` (idempotency marker)."""
    return f"{PREFIX}app:{app}:done:{sha}"


def claim(app: str, sha: str) -> str:
    """String with expiry: an automatic run of ``sha`` is queued or running."""
    return f"{PREFIX}app:{app}:claim:{sha}"


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


def lost_attempts(app: str, sha: str) -> str:
    """Counter with expiry: automatic attempts of ``sha`` that died with their worker."""
    return f"{PREFIX}app:{app}:lost:{sha}"


# -- hosts and instances (an instance is one app on one host) ---------------------
def instances(app: str) -> str:
    """Hash: host -> JSON report of ``app`` on that host (sha, ready, boot, seen_at)."""
    return f"{PREFIX}app:{app}:instances"


def first_seen(app: str) -> str:
    """Sorted set: commit -> Unix time any host first reported it (newest wins)."""
    return f"{PREFIX}app:{app}:first_seen"


def instance_done(app: str, host: str, boot_id: str, sha: str) -> str:
    """String: id of the run that finished ``sha`` on ``host`` in this boot (scope instance)."""
    return f"{PREFIX}app:{app}:host:{host}:boot:{boot_id}:done:{sha}"


def instance_claim(app: str, host: str, sha: str) -> str:
    """String with expiry: a run of ``sha`` on ``host`` is queued, waiting or running."""
    return f"{PREFIX}app:{app}:host:{host}:claim:{sha}"


def instance_lock(app: str, host: str) -> str:
    """String with expiry: the run holding ``app``'s instance on ``host`` now."""
    return f"{PREFIX}app:{app}:host:{host}:lock"


def instance_active(app: str, host: str) -> str:
    """String: id of the run holding ``app``'s instance lock on ``host`` (scope instance)."""
    return f"{PREFIX}app:{app}:host:{host}:active"
