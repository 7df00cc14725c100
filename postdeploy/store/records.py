"""A run of an app's job, as stored in Redis and shown by the CLI and --json."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass, fields
from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from postdeploy.store.deployments import Deployment


class Status(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    ERROR = "error"  # nothing was executed: bad appspec, git failure, ...
    SUPERSEDED = "superseded"  # an automatic run of a deployment that is no longer the latest
    LOST = "lost"  # its worker died mid-run; the deployment is run again
    WAITING = "waiting"  # the readiness gate is polling the app before the job starts
    CANCELLED = "cancelled"  # stopped or kept from starting by an operator

    @property
    def finished(self) -> bool:
        return self not in (Status.QUEUED, Status.WAITING, Status.RUNNING)


class Trigger(StrEnum):
    AUTO = "auto"
    MANUAL = "manual"


@dataclass
class RunRecord:
    """One run; times are Unix seconds, ``None`` until they happen."""

    id: str
    app: str
    sha: str
    trigger: Trigger
    status: Status = Status.QUEUED
    exit_code: int | None = None
    reason: str | None = None
    queued_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    worker: str | None = None
    timeout: int | None = None
    command: str | None = None
    output_bytes: int = 0
    task_id: str | None = None  # the Celery task carrying it, once a worker took it
    host: str | None = None  # POSTDEPLOY_HOST of the worker that ran it (or must run it)
    deployment: int | None = None  # the app's deployment it runs for (None: sha never deployed)
    previous_sha: str | None = None  # the commit that deployment replaced (None: the first)
    # Whether the appspec at sha sets a readiness gate, as the check that queued the run
    # read it (None: not known): a run without one reads no appspec before its checkout.
    gated: bool | None = None

    def __post_init__(self) -> None:
        # JSON and callers give plain strings; keep the fields typed whatever came in.
        self.trigger = Trigger(self.trigger)
        self.status = Status(self.status)

    @classmethod
    def new(cls, app: str, sha: str, trigger: Trigger | str,
            deployment: Deployment | None = None) -> RunRecord:
        """A queued run; ``deployment``: the one it runs for (its id and previous commit)."""
        return cls(id=uuid.uuid4().hex[:16], app=app, sha=sha, trigger=Trigger(trigger),
                   queued_at=time.time(), deployment=deployment.id if deployment else None,
                   previous_sha=deployment.previous_sha if deployment else None)

    @property
    def duration(self) -> float | None:
        if self.started_at is None:
            return None
        return (self.finished_at or time.time()) - self.started_at

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> RunRecord:
        data: dict[str, Any] = json.loads(text)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
