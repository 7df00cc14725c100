"""How the CLI shows apps and runs: readable tables and stable JSON.

The JSON shapes are a contract (scripts parse them); docs/commands.md documents them.
Add fields, never rename or remove them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from postdeploy.store.decisions import Event
from postdeploy.store.deployments import Deployment
from postdeploy.store.instances import Instance
from postdeploy.store.records import RunRecord

if TYPE_CHECKING:
    from postdeploy.store.verdict import Verdict

RUN_FIELDS = ("id", "app", "sha", "trigger", "status", "exit_code", "reason", "queued_at",
              "started_at", "finished_at", "duration", "worker", "timeout", "command",
              "output_bytes", "host", "deployment", "previous_sha")


@dataclass(frozen=True)
class AppStatus:
    """One row of `postdeploy status`."""

    app: str
    source: str | None
    last_seen_sha: str | None
    latest_run: RunRecord | None
    check_error: str | None = None  # why the latest commit checks fail, while they do
    last_push_at: float | None = None  # when the latest push webhook for the app arrived
    instances: tuple[Instance, ...] = ()  # the app on each host that reports it
    deployment: Deployment | None = None  # the app's current deployment
    verdict: Verdict | None = None  # how its job went, everywhere it had to run


def run_json(record: RunRecord) -> dict[str, Any]:
    """A run as JSON: every field of RUN_FIELDS, always present (null when unknown)."""
    duration = record.duration
    values: dict[str, Any] = {
        "id": record.id, "app": record.app, "sha": record.sha, "trigger": record.trigger,
        "status": record.status, "exit_code": record.exit_code, "reason": record.reason,
        "queued_at": record.queued_at, "started_at": record.started_at,
        "finished_at": record.finished_at,
        "duration": round(duration, 3) if duration is not None else None,
        "worker": record.worker, "timeout": record.timeout, "command": record.command,
        "output_bytes": record.output_bytes, "host": record.host,
        "deployment": record.deployment, "previous_sha": record.previous_sha,
    }
    return {name: values[name] for name in RUN_FIELDS}


def status_json(rows: Sequence[AppStatus]) -> dict[str, Any]:
    return {"apps": [{"app": row.app, "source": row.source,
                      "last_seen_sha": row.last_seen_sha,
                      "latest_run": run_json(row.latest_run) if row.latest_run else None,
                      "check_error": row.check_error,
                      "last_push_at": row.last_push_at,
                      "instances": [i.public() for i in row.instances],
                      "deployment": _deployment_json(row.deployment),
                      "verdict": row.verdict.public() if row.verdict else None}
                     for row in rows]}


def _deployment_json(deployment: Deployment | None) -> dict[str, Any] | None:
    if deployment is None:
        return None
    return {"id": deployment.id, "sha": deployment.sha,
            "previous_sha": deployment.previous_sha, "at": deployment.at}


def history_json(app: str, runs: Sequence[RunRecord]) -> dict[str, Any]:
    return {"app": app, "runs": [run_json(r) for r in runs]}


def status_table(rows: Sequence[AppStatus], now: float | None = None) -> str:
    now = time.time() if now is None else now
    lines = [("APP", "COMMIT", "LATEST RUN", "TRIGGER", "STATUS", "WHEN", "TOOK",
              "DEPLOYMENT", "LAST PUSH")]
    for row in rows:
        run = row.latest_run
        lines.append((row.app, short(row.last_seen_sha),
                      run.id if run else "-", run.trigger if run else "-",
                      _status_text(run) if run else "no runs yet",
                      ago(_when(run), now) if run else "-",
                      took(run.duration) if run else "-",
                      _deployment_text(row.deployment),
                      ago(row.last_push_at, now)))
    failing = [f"{row.app}: commit check failing: {row.check_error}"
               for row in rows if row.check_error]
    # Scope instance: one line per deployment, as its runs are one per host.
    verdicts = [f"{row.app}: {row.verdict.text}" for row in rows
                if row.verdict and row.verdict.per_instance]
    return "\n".join([table(lines), *failing, *verdicts, *instance_lines(rows, now)])


def instance_lines(rows: Sequence[AppStatus], now: float) -> list[str]:
    """Under the table: each app's instances (host, commit, ready, last report)."""
    lines = [("INSTANCE", "COMMIT", "READY", "REPORTED")]
    for row in rows:
        for i in row.instances:
            ready = "-" if i.ready is None else ("yes" if i.ready else
                                                 f"no ({i.answer})" if i.answer else "no")
            lines.append((f"{row.app}@{i.host}", short(i.sha), ready, ago(i.seen_at, now)))
    return ["", table(lines)] if len(lines) > 1 else []


def history_table(runs: Sequence[RunRecord], now: float | None = None) -> str:
    now = time.time() if now is None else now
    lines = [("RUN", "COMMIT", "TRIGGER", "STATUS", "WHEN", "TOOK", "REASON")]
    for run in runs:
        lines.append((run.id, short(run.sha), run.trigger, _status_text(run),
                      ago(_when(run), now), took(run.duration), run.reason or ""))
    return table(lines)


def why_table(app: str, sha: str, events: Sequence[Event], verdict: str) -> str:
    """`postdeploy why`: the commit, then one line per event, oldest first."""
    lines = [("WHEN", "HOST", "WHAT")]
    for event in events:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event.at))
        lines.append((when, event.host or "-", event.what))
    story = table(lines) if len(lines) > 1 else "nothing is known about this commit"
    return f"{app}@{sha}\n{story}\nverdict: {verdict}"


def table(lines: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns, two spaces apart; the last column is not padded."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]) - 1)]
    out = []
    for line in lines:
        cells = [cell.ljust(width) for cell, width in zip(line, widths, strict=False)]
        out.append("  ".join([*cells, line[-1]]).rstrip())
    return "\n".join(out)


def short(sha: str | None) -> str:
    return sha[:7] if sha else "-"


def ago(timestamp: float | None, now: float) -> str:
    if timestamp is None:
        return "-"
    seconds = max(0, int(now - timestamp))
    for size, unit in ((86_400, "d"), (3_600, "h"), (60, "m")):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def took(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes}m{rest:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def _when(run: RunRecord) -> float | None:
    return run.finished_at or run.started_at or run.queued_at


def _deployment_text(deployment: Deployment | None) -> str:
    """``#3 from 1a2b3c4``: the app's third deployment, which replaced commit 1a2b3c4."""
    if deployment is None:
        return "-"
    if deployment.previous_sha is None:
        return f"#{deployment.id}"
    return f"#{deployment.id} from {short(deployment.previous_sha)}"


def _status_text(run: RunRecord) -> str:
    if run.exit_code not in (None, 0):
        return f"{run.status} (exit {run.exit_code})"
    return run.status
