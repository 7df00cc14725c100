"""Redis restarts and outages under a running worker and beat, neither restarted."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import redis

from postdeploy.store.state import StateStore
from tests.faults.conftest import Executor, FaultScope
from tests.faults.harness import audit, journal_job, journal_lines
from tests.support.core import (
    GitRemote,
    appspec_yaml,
    runs,
    wait_for,
)

INTERVAL = 1.0
OUTAGE = 25.0  # seconds Redis stays down in the outage test
# Log records the processes may write about one outage: connection lost, reconnect
# attempts at growing delays (2, 4, 6, ... s, capped at 30 s by Celery), beat's one
# report per minute. One per second would be 2 * OUTAGE.
OUTAGE_RECORDS_MAX = 12


def succeeded(client: redis.Redis, sha: str, timeout: float = 60) -> None:
    wait_for(lambda: any(r.sha == sha and r.status == "succeeded"
                         for r in runs(client, "shop")), timeout,
             what=f"a succeeded run of {sha[:7]}")


def running(client: redis.Redis, sha: str, journal: Path) -> str:
    def started() -> str | None:
        return next((r.id for r in runs(client, "shop") if r.sha == sha
                     and r.id in journal_lines(journal, "start")), None)
    return wait_for(started, 40, what=f"the job of {sha[:7]} to start")


def checks_resume(client: redis.Redis, count: int = 2) -> None:
    store = StateStore(client)
    for _ in range(count):
        before = store.checked_at("shop") or 0.0
        wait_for(lambda b=before: (store.checked_at("shop") or 0.0) > b,  # type: ignore[misc]
                 60, what="a commit check")


def test_redis_restarts_with_persistence(
        tmp_path: Path, remote: GitRemote, executor: Callable[..., Executor],
        fault: FaultScope, report: Callable[[str], None]) -> None:
    journal = tmp_path / "journal"
    quick = appspec_yaml(journal_job(journal, "echo quick"))
    shas = [remote.commit({"appspec.yaml": quick}, "c1")]
    started = executor(interval=INTERVAL, persistent=True)
    server, client, worker, beat = started.server, started.client, started.worker, started.beat
    pids = (worker.proc.pid, beat.proc.pid)
    succeeded(client, shas[0])

    with fault("redis restart while idle (persistent)") as f:
        server.stop()
        server.start()
        shas.append(remote.commit({"appspec.yaml": quick, "n": "2"}, "c2"))
        succeeded(client, shas[-1])
        assert worker.alive() and beat.alive()
        f.audit = audit(client, "shop", shas)

    with fault("redis restart mid-job (persistent)") as f:
        shas.append(remote.commit({"appspec.yaml": appspec_yaml(
            journal_job(journal, "sleep 5; echo slow")), "n": "3"}, "c3"))
        run_id = running(client, shas[-1], journal)
        server.stop()
        wait_for(lambda: "lost" in worker.log().lower() or "error" in worker.log().lower(),
                 20, what="the worker to notice Redis went away")
        server.start()
        succeeded(client, shas[-1])
        record = next(r for r in runs(client, "shop") if r.sha == shas[-1])
        assert (record.id, record.status) == (run_id, "succeeded")
        shas.append(remote.commit({"appspec.yaml": quick, "n": "4"}, "c4"))
        succeeded(client, shas[-1])
        f.audit = audit(client, "shop", shas)

    with fault(f"redis down {OUTAGE:.0f} s") as f:
        checks_resume(client)
        before = (len(worker.log().splitlines()), len(beat.log().splitlines()))
        server.stop()
        down_at = time.monotonic()
        # The outage lasts OUTAGE seconds; the processes must stay up all along.
        wait_for(lambda: not (worker.alive() and beat.alive())
                 or time.monotonic() - down_at >= OUTAGE, OUTAGE + 5,
                 what="the outage to last")
        assert worker.alive() and beat.alive()
        worker_lines = worker.log().splitlines()[before[0]:]
        beat_lines = beat.log().splitlines()[before[1]:]
        server.start()
        shas.append(remote.commit({"appspec.yaml": quick, "n": "5"}, "c5"))
        succeeded(client, shas[-1], timeout=90)
        # Count log records (a record may span lines, e.g. "Trying again in 4 s...").
        worker_records = [line for line in worker_lines if line.startswith("20")]
        beat_records = [line for line in beat_lines if line.startswith("20")]
        report(f"redis down {OUTAGE:.0f} s: {len(worker_records)} worker + "
               f"{len(beat_records)} beat log records while down")
        assert len(worker_records) + len(beat_records) <= OUTAGE_RECORDS_MAX, (
            worker_records + beat_records)
        assert any("Cannot connect to redis" in line for line in worker_records)
        assert any("Redis unavailable" in line for line in beat_records)
        assert (worker.proc.pid, beat.proc.pid) == pids
        f.audit = audit(client, "shop", shas)


def test_redis_restart_without_persistence(
        tmp_path: Path, remote: GitRemote, executor: Callable[..., Executor],
        fault: FaultScope) -> None:
    journal = tmp_path / "journal"
    sha = remote.commit({"appspec.yaml": appspec_yaml(journal_job(journal, "echo once"))})
    started = executor(interval=INTERVAL, persistent=False)
    server, client, worker, beat = started.server, started.client, started.worker, started.beat
    succeeded(client, sha)
    first = runs(client, "shop")[0].id

    with fault("redis restart losing all state (no persistence)") as f:
        server.stop()
        server.start()
        assert StateStore(client).get_run(first) is None  # history is gone too
        # Every idempotency marker is gone: the current commit runs once more, not more.
        succeeded(client, sha)
        checks_resume(client, 4)
        starts = journal_lines(journal, "start")
        assert len(starts) == 2, starts
        assert worker.alive() and beat.alive()
        f.audit = audit(client, "shop", [sha])

    with fault("redis restart losing all state mid-job (no persistence)") as f:
        slow = remote.commit({"appspec.yaml": appspec_yaml(
            journal_job(journal, "sleep 6; echo slow"))}, "slow")
        run_id = running(client, slow, journal)
        server.stop()
        server.start()
        # The running job renews its lock, claim and record, so the checks after the
        # wipe see a commit in progress: it finishes once, recorded, never overlapped.
        succeeded(client, slow)
        checks_resume(client, 3)
        slow_starts = [r for r in journal_lines(journal, "start") if r not in starts]
        assert slow_starts == [run_id], slow_starts  # not even the allowed extra run
        assert journal_lines(journal, "overlap") == []
        record = next(r for r in runs(client, "shop") if r.sha == slow)
        assert (record.id, record.status) == (run_id, "succeeded")
        assert worker.alive() and beat.alive()
        f.audit = audit(client, "shop", [slow])
