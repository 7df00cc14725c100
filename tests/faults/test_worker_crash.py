"""A worker dies mid-job: host crash (SIGKILL everything), a pool process killed
(OOM killer), and a clean SIGTERM shutdown. The commit's job still completes exactly
once, two copies never run at once, and the lost attempt stays in history as `lost`.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import redis

from postdeploy.run.runner import job_processes
from tests.faults.conftest import Executor, FaultScope
from tests.faults.harness import audit, crash_host, journal_job, journal_lines, worker_ready
from tests.support.core import (
    GitRemote,
    appspec_yaml,
    runs,
    wait_for,
)

INTERVAL = 1.0
LOCK_TTL = 5  # Settings.lock_ttl for a 1 s interval (clamped to 5..30 s)
JOB_SECONDS = 4
# The bound the contract promises once a worker is back: the dead run's claim and lock
# lapse (one lock TTL), the next check re-enqueues (two intervals), the job runs again.
RERUN_BOUND = LOCK_TTL + 2 * INTERVAL + JOB_SECONDS


def running_job(client: redis.Redis, sha: str, journal: Path) -> str:
    """Wait until the job of ``sha`` is executing; its run id."""
    def started() -> str | None:
        for record in runs(client, "shop"):
            if (record.sha == sha and record.status == "running"
                    and record.id in journal_lines(journal, "start")):
                return record.id
        return None
    return wait_for(started, 40, what=f"the job of {sha[:7]} to run")


def completed(client: redis.Redis, sha: str) -> list[str]:
    return [r.status for r in runs(client, "shop") if r.sha == sha]


def test_worker_dies_mid_job(tmp_path: Path, remote: GitRemote,
                             executor: Callable[..., Executor], fault: FaultScope,
                             report: Callable[[str], None]) -> None:
    journal = tmp_path / "journal"
    job = journal_job(journal, f"sleep {JOB_SECONDS}")
    sha1 = remote.commit({"appspec.yaml": appspec_yaml(job)}, "one")
    started = executor(interval=INTERVAL)
    client, worker = started.client, started.worker

    with fault("host crash mid-job (SIGKILL worker group and job)") as f:
        lost_id = running_job(client, sha1, journal)
        crash_host(worker, [lost_id])
        crashed_at = time.monotonic()
        worker = started.start("-b", beat=False)
        wait_for(lambda: "succeeded" in completed(client, sha1), RERUN_BOUND + 30,
                 what="the crashed commit's job to run again")
        took = time.monotonic() - crashed_at
        report(f"host crash: job re-ran to completion {took:.1f} s after the crash "
               f"(bound {RERUN_BOUND} s + worker start-up)")
        assert took < RERUN_BOUND + 15
        assert completed(client, sha1) == ["lost", "succeeded"]
        lost = next(r for r in runs(client, "shop") if r.id == lost_id)
        assert lost.status == "lost" and "worker stopped mid-run" in (lost.reason or "")
        assert journal_lines(journal, "overlap") == []
        f.audit = audit(client, "shop", [sha1])

    with fault("pool process killed mid-job (job orphaned)") as f:
        wait_for(lambda: worker_ready(worker), 30, what="worker ready")
        # Longer than the lock TTL: the orphan would still run when the commit re-runs.
        long_job = journal_job(journal, "sleep 15")
        sha2 = remote.commit({"appspec.yaml": appspec_yaml(long_job)}, "two")
        run_id = running_job(client, sha2, journal)
        job_pid = job_processes(run_id)[0]
        pool = psutil.Process(job_pid).parent()
        while pool is not None and pool.pid != worker.proc.pid and (
                pool.ppid() != worker.proc.pid):
            pool = pool.parent()
        assert pool is not None and pool.ppid() == worker.proc.pid
        os.kill(pool.pid, signal.SIGKILL)
        wait_for(lambda: "succeeded" in completed(client, sha2), RERUN_BOUND + 15 + 30,
                 what="the orphaned commit's job to run again")
        assert completed(client, sha2) == ["lost", "succeeded"]
        # The orphan was stopped before the new attempt started: no overlap.
        assert journal_lines(journal, "overlap") == []
        assert job_processes(run_id) == []
        assert worker.alive()
        f.audit = audit(client, "shop", [sha1, sha2])

    with fault("clean worker shutdown (SIGTERM) mid-job") as f:
        sha3 = remote.commit({"appspec.yaml": appspec_yaml(job), "n": "3"}, "three")
        run_id = running_job(client, sha3, journal)
        worker.proc.send_signal(signal.SIGTERM)
        # Warm shutdown: the running job is finished and recorded before the worker exits.
        worker.proc.wait(JOB_SECONDS + 20)
        assert completed(client, sha3) == ["succeeded"]
        assert run_id in journal_lines(journal, "end")
        worker = started.start("-c", beat=False, wait_ready=True)
        checked = float(client.get("postdeploy:app:shop:checked_at") or 0)
        wait_for(lambda: float(client.get("postdeploy:app:shop:checked_at") or 0)
                 > checked + 3 * INTERVAL, 30, what="three more checks")
        assert completed(client, sha3) == ["succeeded"]
        assert journal_lines(journal, "overlap") == []
        f.audit = audit(client, "shop", [sha1, sha2, sha3])
