"""Notifications: tell people, through Apprise, when a run fails and when its app recovers.

The run lifecycle calls :func:`notify_if_needed` once a run has its final
status; that decides the event (at most once per run and event, by a SET NX
marker) and queues the ``postdeploy.notify`` task, which calls :func:`deliver`.
Sending happens there, never in the job's own task: a receiver that is down or
slow costs a retry later, never the run's record or the worker. Each message to
each URL is sent from a child process with a total deadline (SEND_DEADLINE), so
a receiver that dribbles its answer frees the worker process on time.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import socket
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import apprise
import redis

from postdeploy.announce.forked import DeadlinePassed, call_forked
from postdeploy.config.notify import MAX_SOCKET_TIMEOUT, mask_url, quiet_apprise
from postdeploy.config.redaction import mask_secrets
from postdeploy.config.secrets import executor_secrets
from postdeploy.config.settings import Settings
from postdeploy.store import keys
from postdeploy.store.celery_app import app as celery
from postdeploy.store.records import RunRecord, Status, Trigger
from postdeploy.store.state import INSTANCE_SCOPE_MARK, StateStore
from postdeploy.store.verdict import judge

log = logging.getLogger(__name__)

TASK_NAME = "postdeploy.notify"
NOTIFY_ATTEMPTS = 4  # tries per notification and URL: the first and three retries
MARKER_TTL = 30 * 86_400  # seconds the "already notified" marker of a run is kept
NOTIFY_EXPIRES = 3_600  # seconds after which a queued notification is stale and dropped
OUTPUT_LINES = 20  # last lines of output in a message
LINE_CHARS = 300  # longest output line in a message; the rest is cut
FAILURES = frozenset({Status.FAILED.value, Status.TIMED_OUT.value, Status.ERROR.value,
                      Status.LOST.value})
ALL_URLS = "*"  # in a retry's pending list: every URL (the try failed before sending)
# Seconds one message to one URL may take in all: Apprise bounds each socket read
# (MAX_SOCKET_TIMEOUT), not a receiver that sends its answer a byte at a time.
SEND_DEADLINE = 10.0
_HEADLINE = {"failed": "failed", "timed_out": "timed out", "error": "could not run",
             "lost": "was lost", "cancelled": "was cancelled", "succeeded": "succeeded",
             "recovered": "recovered"}


@dataclass(frozen=True)
class Message:
    title: str
    body: str
    kind: apprise.NotifyType


@dataclass(frozen=True)
class Delivery:
    """The outcome of one message to one URL; ``shown`` and ``error`` are masked."""

    url: str
    shown: str
    ok: bool
    error: str | None = None


def destinations(settings: Settings, app_name: str | None) -> tuple[str, ...]:
    """Where ``app_name``'s messages go: the global URLs, then the app's own.

    ``None``: every configured URL (what `notify --test` without an app tries).
    """
    if app_name is None:
        urls = [*settings.notify, *(u for a in settings.apps for u in a.notify)]
    else:
        app = settings.app(app_name)
        urls = [*settings.notify, *(app.notify if app else ())]
    return tuple(dict.fromkeys(urls))


def notify_if_needed(settings: Settings, store: StateStore, run: RunRecord | str) -> None:
    """Queue the message ``run``'s final status calls for, if any; never raises.

    The run lifecycle calls this once a run has its final status (``run`` may be
    a run id, as for a run found lost). Repeated calls queue nothing more.
    """
    try:
        record = store.get_run(run) if isinstance(run, str) else run
        if record is None or not Status(record.status).finished:
            return
        if not destinations(settings, record.app):
            return
        deployment = _per_instance_deployment(store, record)
        if deployment is not None:
            # One message per deployment, once every instance has run it.
            verdict = judge(store, record.app, record.sha)
            if not verdict.finished or verdict.deployment is None or \
                    verdict.deployment.id != deployment:
                return
            record = next((r for r in verdict.runs if r.status != Status.SUCCEEDED), record)
        event, previous = _event_for(settings, store, record)
        if event is None:
            return
        marker = (keys.notified(record.id, event) if deployment is None else
                  keys.deployment_notified(record.app, deployment, event))
        if not store.mark_once(marker, MARKER_TTL):
            return
        celery.send_task(TASK_NAME, kwargs={"run_id": record.id, "event": event,
                                            "previous": previous, "deployment": deployment},
                         expires=NOTIFY_EXPIRES)
    except Exception as exc:  # a notification must never disturb the run lifecycle
        run_id = run if isinstance(run, str) else run.id
        log.warning("notification for run %s not queued: %s", run_id,
                    mask_secrets(str(exc), _secrets(settings)))


def _per_instance_deployment(store: StateStore, record: RunRecord) -> int | None:
    """The deployment ``record`` ran for, if it runs once per instance (one verdict)."""
    if record.trigger != Trigger.AUTO or record.deployment is None:
        return None
    mark = store.done_mark(record.app, record.deployment)
    return record.deployment if mark == INSTANCE_SCOPE_MARK else None


def _event_for(settings: Settings, store: StateStore,
               record: RunRecord) -> tuple[str | None, str | None]:
    """The event to notify and, for "recovered", the failed run it recovers from.

    Runs of one app end one at a time (its run lock), so this per-app state is
    updated in order.
    """
    status = str(record.status)
    wanted = settings.notify_on
    if status in FAILURES:
        if status not in wanted:
            return None, None
        store.set_failing(record.app, record.id, status)
        return status, None
    if status == Status.SUCCEEDED.value:
        failed_run = store.pop_failing(record.app)
        if failed_run and "recovered" in wanted:
            return "recovered", failed_run
        return ("succeeded", None) if status in wanted else (None, None)
    return (status, None) if status in wanted else (None, None)


def retry_delay(settings: Settings, attempt: int) -> float:
    """Seconds before try ``attempt + 1``: exponential backoff from POSTDEPLOY_NOTIFY_BACKOFF."""
    return float(settings.notify_backoff * 2 ** (attempt - 1))


def deliver(settings: Settings, store: StateStore, run_id: str, event: str,
            pending: list[str] | None, attempt: int, previous: str | None = None,
            deployment: int | None = None) -> list[str]:
    """Send one try of ``run_id``'s ``event`` message; return the URLs to retry.

    ``pending`` (fingerprints, never URLs: task messages sit in Redis) narrows a
    retry to the URLs that failed. On the last try nothing is returned and each
    URL still failing is a WARNING. Counts results in NOTIFICATIONS_TOTAL. Never
    raises: an error here (Redis away, a time limit) is a failed try of every URL.
    """
    try:
        return _deliver(settings, store, run_id, event, pending, attempt, previous, deployment)
    except Exception as exc:
        reason = mask_secrets(f"{type(exc).__name__}: {exc}", _secrets(settings))
        if attempt >= NOTIFY_ATTEMPTS:
            log.warning("could not send the %s notification of run %s after %d tries: %s; "
                        "the run's record is unchanged", event, run_id, attempt, reason)
            return []
        log.info("%s notification of run %s failed (try %d of %d): %s; retrying in %g s",
                 event, run_id, attempt, NOTIFY_ATTEMPTS, reason, retry_delay(settings, attempt))
        return pending or [ALL_URLS]


def _deliver(settings: Settings, store: StateStore, run_id: str, event: str,
             pending: list[str] | None, attempt: int, previous: str | None,
             deployment: int | None) -> list[str]:
    record = store.get_run(run_id)
    if record is None:
        log.warning("%s notification of run %s dropped: the run is no longer stored",
                    event, run_id)
        return []
    urls = [u for u in destinations(settings, record.app)
            if not pending or ALL_URLS in pending or fingerprint(u) in pending]
    if not urls:
        return []
    prior = store.get_run(previous) if previous else None
    verdict = judge(store, record.app, record.sha) if deployment is not None else None
    message = compose(settings, store, record, event, prior,
                      verdict.text if verdict is not None else None)
    results = send(urls, message, _secrets(settings))
    failed = [r for r in results if not r.ok]
    final = attempt >= NOTIFY_ATTEMPTS
    _count(store, len(results) - len(failed), len(failed) if final else 0)
    label = f"{record.app}@{record.sha[:7]}"
    for result in results:
        if result.ok:
            log.info("%s: %s notification sent to %s (run %s)", label, event, result.shown,
                     run_id)
        elif final:
            log.warning("%s: could not send the %s notification of run %s to %s after %d "
                        "tries: %s; the run's record is unchanged", label, event, run_id,
                        result.shown, attempt, result.error)
        else:
            log.info("%s: %s notification to %s failed (try %d of %d): %s; retrying in %g s",
                     label, event, result.shown, attempt, NOTIFY_ATTEMPTS, result.error,
                     retry_delay(settings, attempt))
    return [] if final else [fingerprint(r.url) for r in failed]


def send_test(settings: Settings, app_name: str | None) -> list[Delivery]:
    """Send a test message to each of ``app_name``'s URLs (all when None)."""
    host = socket.gethostname()
    about = f"app {app_name}" if app_name else "all apps"
    message = Message(
        title="postdeploy: test notification",
        body=(f"A test message from postdeploy on {host} ({about}).\n"
              f"Runs are reported here on: {', '.join(sorted(settings.notify_on))}."),
        kind=apprise.NotifyType.INFO)
    return send(destinations(settings, app_name), message, _secrets(settings))


def compose(settings: Settings, store: StateStore, record: RunRecord, event: str,
            previous: RunRecord | None = None, hosts: str | None = None) -> Message:
    """Title and text of ``record``'s ``event`` message; every secret the executor knows masked.

    ``hosts``: the verdict of a deployment run once per instance (the message is
    about all of them; ``record`` is one that failed, if any did).
    """
    label = f"{record.app}@{record.sha[:7]}"
    status = str(record.status)
    if record.exit_code is not None:
        status += f" (exit code {record.exit_code})"
    lines = [f"App: {record.app}", f"Commit: {record.sha}",
             f"Previous commit: {record.previous_sha or '-'}", f"Status: {status}"]
    if hosts is not None:
        lines.append(f"Hosts: {hosts.split(': ', 1)[-1]}")
    if record.reason:
        lines.append(f"Reason: {record.reason}")
    if event == "recovered":
        before = (f"run {previous.id} of {previous.sha[:7]} ended {previous.status}"
                  if previous else "an earlier run failed")
        lines.append(f"Recovered: {before}; this is the first success since")
    duration = record.duration
    lines += [f"Trigger: {record.trigger}",
              f"Duration: {f'{duration:.1f} s' if duration is not None else '-'}",
              f"Host: {record.worker or '-'}", f"Run: {record.id}"]
    if event not in ("recovered", "succeeded"):
        tail = _last_lines(store.read_output(record.id)[0])
        lines += ["", f"Last {len(tail)} lines of output:" if tail else "No output.", *tail]
    lines += ["", f"More: postdeploy logs {record.app} {record.id}"]
    body = mask_secrets("\n".join(lines), _secrets(settings))
    kind = (apprise.NotifyType.SUCCESS if event in ("recovered", "succeeded") else
            apprise.NotifyType.WARNING if event == "cancelled" else apprise.NotifyType.FAILURE)
    return Message(f"postdeploy: {label} {_HEADLINE.get(event, event)}", body, kind)


def send(urls: Iterable[str], message: Message, secrets: list[str]) -> list[Delivery]:
    """Send ``message`` to each URL in turn; what happened to each, masked."""
    results = []
    for url in urls:
        try:
            ok, errors = call_forked(functools.partial(_send_collecting, url, message),
                                     SEND_DEADLINE)
        except DeadlinePassed:
            ok, errors = False, [f"no complete answer within {SEND_DEADLINE:g} s"]
        except Exception as exc:  # the child could not run or report: one failed URL
            ok, errors = False, [f"{type(exc).__name__}: {exc}"]
        error = None if ok else mask_secrets("; ".join(errors) or "not sent", secrets)
        results.append(Delivery(url, mask_url(url), bool(ok), error))
    return results


def _send_collecting(url: str, message: Message) -> tuple[bool, list[str]]:
    """Send to ``url`` here (in the child); whether it went, and Apprise's reasons if not."""
    with _apprise_errors() as errors:
        try:
            ok = _send_one(url, message)
        except Exception as exc:  # a plugin's bug is one failed URL, not a crash
            errors.append(f"{type(exc).__name__}: {exc}")
            ok = False
    return ok, errors


def _send_one(url: str, message: Message) -> bool:
    plugin = apprise.Apprise.instantiate(url)
    if plugin is None:
        raise ValueError("Apprise cannot load this URL")
    # A receiver that accepts the connection and never answers must not hold
    # the worker process: bound each request, whatever the URL asks for.
    plugin.socket_connect_timeout = min(plugin.socket_connect_timeout, MAX_SOCKET_TIMEOUT)
    plugin.socket_read_timeout = min(plugin.socket_read_timeout, MAX_SOCKET_TIMEOUT)
    return bool(plugin.notify(body=message.body, title=message.title,
                              notify_type=message.kind,
                              body_format=apprise.NotifyFormat.TEXT))


@contextmanager
def _apprise_errors() -> Iterator[list[str]]:
    """Collect Apprise's warnings meanwhile (the reason a send failed), kept out of our log."""
    found: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            found.append(record.getMessage().rstrip("."))

    logger = logging.getLogger(apprise.LOGGER_NAME)
    handler = Collect(logging.WARNING)
    level = logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.WARNING:
        logger.setLevel(logging.WARNING)
    try:
        with quiet_apprise():
            yield found
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _secrets(settings: Settings) -> list[str]:
    """The executor's secrets (:mod:`postdeploy.config.secrets`), with the broker in use."""
    return executor_secrets(settings, str(celery.conf.broker_url or "") or None)


def fingerprint(url: str) -> str:
    """A short id of ``url`` for task messages, which must not carry the URL itself."""
    return hashlib.sha256(url.encode()).hexdigest()[:16]


def _last_lines(tail: bytes) -> list[str]:
    lines = tail.decode("utf-8", errors="replace").splitlines()[-OUTPUT_LINES:]
    return [_printable(line[:LINE_CHARS] + ("..." if len(line) > LINE_CHARS else ""))
            for line in lines]


def _printable(line: str) -> str:
    # Escape control characters: a job's output must not restyle or rewrite the message.
    return "".join(c if c.isprintable() or c == "\t" else repr(c)[1:-1] for c in line)


def _count(store: StateStore, sent: int, failed: int) -> None:
    try:
        pipe = store.client.pipeline(transaction=False)
        if sent:
            pipe.hincrby(keys.NOTIFICATIONS_TOTAL, "sent", sent)
        if failed:
            pipe.hincrby(keys.NOTIFICATIONS_TOTAL, "failed", failed)
        pipe.execute()
    except redis.RedisError as exc:
        log.debug("notification counters not updated: %s", exc)
