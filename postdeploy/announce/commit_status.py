"""Commit statuses: tell the git host how each run of a commit went, as `postdeploy/<app>`.

A pipeline, a pull request page or a branch protection rule can then see whether
the post-deploy job passed. Per app, optionally (``commit_status:`` in
postdeploy.yaml), on GitHub, GitLab or Gitea. The run lifecycle calls
:func:`report` when a run starts (pending) and when it ends; that queues the
``postdeploy.commit_status`` task, which sends one request with a total deadline
and is retried with backoff, like notifications. A status that cannot be sent is
a WARNING and never changes the run.

The token comes from the executor's environment (a ``POSTDEPLOY_*`` variable, so
no job ever sees it) and is masked wherever text leaves the executor.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from http.client import HTTPConnection, HTTPException, HTTPSConnection
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit

from postdeploy.announce.forked import DeadlinePassed, call_forked
from postdeploy.config.commit_status import CommitStatusConfig
from postdeploy.config.redaction import mask_secrets
from postdeploy.config.secrets import executor_secrets
from postdeploy.store.records import RunRecord, Status

if TYPE_CHECKING:
    from postdeploy.config.settings import Settings
    from postdeploy.store.state import StateStore

log = logging.getLogger(__name__)

TASK_NAME = "postdeploy.commit_status"
ATTEMPTS = 4  # tries per status: the first and three retries
REQUEST_DEADLINE = 10.0  # seconds for one whole request, connect to last byte
MAX_ANSWER = 64 * 1024  # bytes of an answer read (only its status code matters)
DESCRIPTION_CHARS = 140  # GitHub's limit; the others take more
SENT_TTL = 30 * 86_400  # seconds the "already sent" rank of a run is kept
EXPIRES = 3_600  # seconds after which a queued status is stale and dropped

# The provider's word for each run status. Pending ranks below the final states,
# so a late pending never overwrites a result.
_STATES: dict[str, dict[str, str]] = {
    "github": {"queued": "pending", "waiting": "pending", "running": "pending",
               "succeeded": "success", "failed": "failure", "timed_out": "failure",
               "lost": "failure", "error": "error", "cancelled": "error",
               "superseded": "error"},
    "gitlab": {"queued": "pending", "waiting": "pending", "running": "running",
               "succeeded": "success", "failed": "failed", "timed_out": "failed",
               "lost": "failed", "error": "failed", "cancelled": "canceled",
               "superseded": "canceled"},
}
_STATES["gitea"] = _STATES["github"]


@dataclass(frozen=True)
class StatusRequest:
    url: str
    headers: dict[str, str]
    body: bytes


def build_request(config: CommitStatusConfig, token: str, record: RunRecord,
                  description: str) -> StatusRequest:
    """The provider's documented "create a commit status" request for ``record``."""
    state = _STATES[config.provider][str(record.status)]
    context = f"postdeploy/{record.app}"
    description = description[:DESCRIPTION_CHARS]
    headers = {"Content-Type": "application/json", "User-Agent": "postdeploy"}
    if config.provider == "gitlab":
        url = (f"{config.api_url}/projects/{quote(config.repository, safe='')}"
               f"/statuses/{record.sha}")
        headers["PRIVATE-TOKEN"] = token
        body: dict[str, str] = {"state": state, "name": context, "description": description}
    else:
        url = f"{config.api_url}/repos/{config.repository}/statuses/{record.sha}"
        if config.provider == "github":
            headers.update({"Authorization": f"Bearer {token}",
                            "Accept": "application/vnd.github+json",
                            "X-GitHub-Api-Version": "2022-11-28"})
        else:
            headers["Authorization"] = f"token {token}"
        body = {"state": state, "context": context, "description": description}
    return StatusRequest(url, headers, json.dumps(body).encode())


def describe(record: RunRecord) -> str:
    """One line for the status: what happened, where, and why it failed."""
    where = f" on {record.host or record.worker}" if (record.host or record.worker) else ""
    status = Status(record.status)
    if status == Status.QUEUED:
        return "queued"
    if status == Status.WAITING:
        return f"waiting for the app to be ready{where}"
    if status == Status.RUNNING:
        return f"running{where}"
    took = f" in {record.duration:.0f} s" if record.duration is not None else ""
    if status == Status.SUCCEEDED:
        return f"succeeded{took}{where}"
    return f"{status.value.replace('_', ' ')}{where}: {record.reason or 'no reason recorded'}"


def report(settings: Settings, store: StateStore, record: RunRecord) -> None:
    """Queue the status ``record``'s current state calls for, if its app reports any.

    The run lifecycle calls this when a run starts and when it ends; never raises.
    A superseded run is reported only if it was reported as pending before: the
    commit it skipped may be run by another host, whose result must stand.
    """
    try:
        app = settings.app(record.app)
        if app is None or app.commit_status is None:
            return
        if record.status == Status.SUPERSEDED and not store.commit_status_rank(record.id):
            return
        from postdeploy.store.celery_app import app as celery

        celery.send_task(TASK_NAME, kwargs={"run_id": record.id, "status": str(record.status)},
                         expires=EXPIRES)
    except Exception as exc:  # a status must never disturb the run lifecycle
        log.warning("commit status for run %s not queued: %s", record.id,
                    mask_secrets(str(exc), executor_secrets(settings)))


def deliver(settings: Settings, store: StateStore, run_id: str, status: str,
            attempt: int) -> bool:
    """One try at sending ``run_id``'s ``status``; True to retry later.

    In order per run: a pending status is dropped once the run has ended (its
    result is being sent), and a per-run rank keeps a late pending from
    overwriting a result. Never raises.
    """
    try:
        return _deliver(settings, store, run_id, status, attempt)
    except Exception as exc:
        return _failed(settings, run_id, status, attempt,
                       f"{type(exc).__name__}: {exc}")


def _deliver(settings: Settings, store: StateStore, run_id: str, status: str,
             attempt: int) -> bool:
    record = store.get_run(run_id)
    app = settings.app(record.app) if record else None
    if record is None or app is None or app.commit_status is None:
        return False
    config = app.commit_status
    final = Status(status).finished
    if not final and Status(record.status).finished:
        return False  # the result follows (or went) in its own task
    rank = 2 if final else 1
    if store.commit_status_rank(run_id) >= rank:
        return False
    token = settings.environ.get(config.token_env)
    if not token:
        log.warning("%s@%s: commit status not sent: %s is not set in the executor's "
                    "environment", record.app, record.sha[:7], config.token_env)
        return False
    record.status = Status(status)  # the state this message is about
    request = build_request(config, token, record, mask_secrets(
        describe(record), [*executor_secrets(settings), token]))
    code = post(request, REQUEST_DEADLINE)
    if not 200 <= code < 300:
        return _failed(settings, run_id, status, attempt,
                       f"{config.provider} answered HTTP {code}")
    store.set_commit_status_rank(run_id, rank, SENT_TTL)
    log.info("%s@%s: commit status postdeploy/%s %s sent to %s", record.app, record.sha[:7],
             record.app, status, config.provider)
    return False


def _failed(settings: Settings, run_id: str, status: str, attempt: int, why: str) -> bool:
    why = mask_secrets(why, executor_secrets(settings))
    if attempt >= ATTEMPTS:
        log.warning("could not send the %s commit status of run %s after %d tries: %s; the "
                    "run's record is unchanged", status, run_id, attempt, why)
        return False
    log.info("%s commit status of run %s failed (try %d of %d): %s; retrying", status,
             run_id, attempt, ATTEMPTS, why)
    return True


def post(request: StatusRequest, deadline: float) -> int:
    """POST ``request`` and return the HTTP status, all within ``deadline`` seconds.

    A per-read timeout alone lets a server that dribbles its answer hold the
    worker for ever, so the request runs in a forked child that is killed at the
    deadline (:mod:`postdeploy.announce.forked`, as notifications do).
    """
    try:
        return int(call_forked(functools.partial(_post, request, deadline), within=deadline))
    except DeadlinePassed:
        raise TimeoutError(f"no whole answer within {deadline:g} s") from None


def _post(request: StatusRequest, timeout: float) -> int:
    parts = urlsplit(request.url)
    connection_class = HTTPSConnection if parts.scheme == "https" else HTTPConnection
    connection = connection_class(parts.hostname or "", parts.port, timeout=timeout)
    try:
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        connection.request("POST", path, body=request.body, headers=request.headers)
        answer = connection.getresponse()
        answer.read(MAX_ANSWER)
        return int(answer.status)
    except (OSError, HTTPException) as exc:
        raise ConnectionError(f"{type(exc).__name__}: {exc}") from None
    finally:
        connection.close()


def retry_delay(settings: Settings, attempt: int) -> float:
    """Seconds before try ``attempt + 1``: the notifications' backoff."""
    return float(settings.notify_backoff * 2 ** (attempt - 1))
