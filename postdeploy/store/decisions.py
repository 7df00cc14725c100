"""Why a commit ran or not: the decisions taken for each commit of an app, for `why`.

Most of a commit's story is already stored: its deployments (when each began,
what it replaced), its runs (queued, started, ended, where, why) and each
deployment's done marker (the run that did it, "no command", "every instance").
What is not stored anywhere else is noted here, in a capped list per app and
commit: who recorded a deployment, a host that is behind the fleet, a run
waiting on the readiness gate. :func:`story` merges them, oldest first.
Noting never raises and never changes a decision: the story is for people.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass

import redis

from postdeploy.store import keys
from postdeploy.store.deployments import Deployment, DeploymentLog
from postdeploy.store.records import RunRecord, Status, Trigger
from postdeploy.store.state import INSTANCE_SCOPE_MARK, NO_COMMAND_MARK

log = logging.getLogger(__name__)

MAX_NOTES = 100  # per app and commit; the oldest go first
NOTE_TTL = 90 * 86_400  # seconds a commit's notes are kept after the last one


@dataclass(frozen=True)
class Event:
    """One line of a commit's story."""

    at: float
    host: str | None
    what: str
    run: str | None = None

    def public(self) -> dict[str, object]:
        return asdict(self)


def note(client: redis.Redis, app: str, sha: str, what: str, host: str | None = None,
         run: str | None = None, once: str | None = None) -> None:
    """Add ``what`` to the story of ``app``@``sha``; with ``once``, only the first time
    (per commit and ``once`` key: a host behind the fleet is said once, not per report)."""
    try:
        if once is not None and not client.set(keys.decision_once(app, sha, once), "1",
                                               nx=True, ex=NOTE_TTL):
            return
        event = Event(time.time(), host, what, run)
        story_key = keys.decisions(app, sha)
        pipe = client.pipeline(transaction=False)
        pipe.rpush(story_key, json.dumps(event.public()))
        pipe.ltrim(story_key, -MAX_NOTES, -1)
        pipe.expire(story_key, NOTE_TTL)
        pipe.execute()
    except redis.RedisError as exc:
        log.debug("decision for %s@%s not noted: %s", app, sha[:7], exc)


def story(client: redis.Redis, deployments: DeploymentLog, app: str, sha: str,
          runs: list[RunRecord]) -> list[Event]:
    """The story of ``app``@``sha``: its deployments, the noted decisions and ``runs``
    (the app's kept runs; those of other commits are left out), oldest first."""
    events: list[Event] = []
    of_sha = deployments.every_of_sha(app, sha)
    for deployment in of_sha:
        replaced = (f"replacing {deployment.previous_sha[:7]}" if deployment.previous_sha
                    else "the app's first")
        events.append(Event(deployment.at, None,
                            f"deployment {deployment.id} began ({replaced})"))
        done = client.get(keys.done(app, deployment.id))
        if done is not None:
            mark = done.decode() if isinstance(done, bytes) else str(done)
            events.append(Event(deployment.at, None, _done_text(deployment, mark)))
    for raw in client.lrange(keys.decisions(app, sha), 0, -1):
        try:
            events.append(Event(**json.loads(raw)))
        except (TypeError, ValueError):
            continue
    for run in runs:
        if run.sha == sha:
            events.extend(_run_events(run))
    current = deployments.current(app)
    if current is not None and current.sha != sha and any(d.id < current.id for d in of_sha):
        events.append(Event(current.at, None, f"replaced by deployment {current.id} "
                                              f"({current.sha[:7]})"))
    return sorted(events, key=lambda e: e.at)


def _done_text(deployment: Deployment, mark: str) -> str:
    if mark == NO_COMMAND_MARK:
        return (f"deployment {deployment.id}: skipped, POST_DEPLOY_COMMAND is not set at "
                "this commit")
    if mark == INSTANCE_SCOPE_MARK:
        return f"deployment {deployment.id}: scope instance, each host runs it for itself"
    return (f"deployment {deployment.id}: done by run {mark}; checks, pushes and restarts "
            "of the same commit run nothing more")


def _run_events(run: RunRecord) -> list[Event]:
    trigger = "by hand" if run.trigger == Trigger.MANUAL else "automatically"
    of = f" for deployment {run.deployment}" if run.deployment is not None else ""
    found = [Event(run.queued_at or 0.0, None, f"run {run.id} queued {trigger}{of}", run.id)]
    if run.started_at is not None:
        found.append(Event(run.started_at, run.host,
                           f"run {run.id} started on {run.worker or run.host or 'a worker'}",
                           run.id))
    status = Status(run.status)
    if status.finished and run.finished_at is not None:
        ended = {Status.SUPERSEDED: "skipped (superseded)", Status.CANCELLED: "cancelled",
                 Status.LOST: "lost with its worker", Status.TIMED_OUT: "timed out"}.get(
                     status, status.value)
        took = f" after {run.duration:.1f} s" if run.duration is not None else ""
        reason = f": {run.reason}" if run.reason else ""
        found.append(Event(run.finished_at, run.host, f"run {run.id} {ended}{took}{reason}",
                           run.id))
    elif status == Status.WAITING:
        found.append(Event(time.time(), run.host, f"run {run.id} is waiting: {run.reason}",
                           run.id))
    return found
