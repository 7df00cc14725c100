"""2. Trigger latency and 3. per-job overhead, through a real worker.

Latency: from sending postdeploy.check_app after a commit (what `postdeploy check
APP` does) to the job's process starting (the job prints $EPOCHREALTIME), against
Celery's own round trip for an empty task in the same worker, and against the
git work any tool must do to start a new commit's job (ls-remote, fetch,
checkout: plain git processes on the same repositories).
Overhead: manual runs of `true` through the full path (lock, checkout, appspec,
run, record), against `bash -c true` run directly, and against the least a job
started under its guard costs (two forks of a process the worker's size, then
the exec). In each round postdeploy and
its baseline run the same number of times, taking turns going first.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import redis

from bench.harness import (
    GitRemote,
    Service,
    celery_client,
    in_rounds,
    run_git,
    service_env,
    wait_ready,
)
from bench.report import Row, median, percentile
from postdeploy.store.records import RunRecord
from postdeploy.store.state import StateStore
from tests.support.core import appspec_yaml


def _start(root: Path, redis_url: str, remote: GitRemote) -> Service:
    env = service_env(redis_url, root / "state", 3600, POSTDEPLOY_REPO=remote.url,
                      POSTDEPLOY_APP="bench", POSTDEPLOY_LOG_LEVEL="WARNING")
    worker = Service(["-m", "worker"], env, root / "worker.log")
    wait_ready(worker, redis.Redis.from_url(redis_url))
    celery_client(redis_url, root / "state", POSTDEPLOY_REPO=remote.url,
                  POSTDEPLOY_APP="bench")
    return worker


def _times_ms(count: int, action: Callable[[], object]) -> list[float]:
    """Milliseconds each of ``count`` calls of ``action`` took."""
    times = []
    for _ in range(count):
        t0 = time.perf_counter()
        action()
        times.append((time.perf_counter() - t0) * 1000)
    return times


def _empty_task_round_trips(count: int) -> list[float]:
    from postdeploy.store.celery_app import app
    return _times_ms(count, lambda: app.send_task("celery.accumulate", args=[1]).get(timeout=30))


def _fresh(root: Path, redis_url: str) -> tuple[StateStore, GitRemote]:
    """An empty Redis and a new app repository for one measure."""
    root.mkdir(parents=True, exist_ok=True)
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    return StateStore(client), GitRemote(root / "git", "bench")


def measure_latency(root: Path, redis_url: str, commits: int, rounds: int) -> list[Row]:
    """``commits`` commits per round, and as many empty tasks beside them."""
    store, remote = _fresh(root, redis_url)
    spec = {"appspec.yaml": appspec_yaml('echo "START $EPOCHREALTIME"')}
    remote.commit(spec)
    worker = _start(root, redis_url, remote)
    from postdeploy.services.tasks import check_app
    made = 0

    def next_commit() -> str:
        nonlocal made
        made += 1
        return remote.commit({**spec, "n": str(made)})

    def ours() -> dict[str, float]:
        latencies = []
        for _ in range(commits):
            sha = next_commit()
            t0 = time.time()
            check_app.apply_async(args=["bench"])
            record = _wait_run_of(store, sha)
            tail, _ = store.read_output(record.id)
            started = float(tail.decode().split("START ", 1)[1].split()[0])
            latencies.append((started - t0) * 1000)
        return {"p50": median(latencies), "p95": percentile(latencies, 95)}

    def empty_task() -> dict[str, float]:
        times = _empty_task_round_trips(commits)
        return {"base p50": median(times), "base p95": percentile(times, 95)}

    floor_clone = root / "floor-clone"
    run_git(root, "clone", "-q", "--no-checkout", remote.url, str(floor_clone))

    def git_floor() -> dict[str, float]:
        """What any tool must do with git to start a new commit's job: learn it,
        fetch it, check it out. Plain git processes, nothing else."""
        times = []
        for _ in range(commits):
            sha = next_commit()
            t0 = time.perf_counter()
            run_git(floor_clone, "ls-remote", remote.url, "refs/heads/main")
            run_git(floor_clone, "fetch", "-q", remote.url, "+refs/heads/*:refs/remotes/origin/*")
            run_git(floor_clone, "checkout", "-q", "--force", "--detach", sha)
            times.append((time.perf_counter() - t0) * 1000)
        return {"git p50": median(times)}

    try:
        check_app.apply_async(args=["bench"]).get(timeout=60)  # warm: first clone
        _wait_run_of(store, remote.head())
        figures = in_rounds(rounds, ours, empty_task, git_floor)
    finally:
        worker.stop()
    return [
        Row("trigger latency p50", figures["p50"], figures["base p50"], "ms",
            "empty Celery task", "<= baseline + 20 ms",
            lambda r: r.value <= (r.baseline or 0) + 20),
        Row("trigger latency p95", figures["p95"], figures["base p95"], "ms",
            "empty Celery task"),
        Row("trigger latency p50, against git's own work", figures["p50"], figures["git p50"],
            "ms", "ls-remote + fetch + checkout of the commit"),
    ]


def measure_overhead(root: Path, redis_url: str, jobs: int, rounds: int) -> list[Row]:
    """``jobs`` runs of `true` per round, and as many `bash -c true` beside them."""
    store, remote = _fresh(root, redis_url)
    sha = remote.commit({"appspec.yaml": appspec_yaml("true")})
    worker = _start(root, redis_url, remote)
    from postdeploy.services.tasks import run_job

    def one_job() -> None:
        result = run_job.apply_async(kwargs={"app": "bench", "sha": sha}).get(timeout=60)
        assert result["status"] == "succeeded", result

    def ours() -> dict[str, float]:
        return {"job": median(_times_ms(jobs, one_job))}

    def bash_true() -> None:
        subprocess.run(["bash", "-c", "true"], check=True)

    def direct() -> dict[str, float]:
        return {"bash": median(_times_ms(jobs, bash_true))}

    def guarded_floor() -> dict[str, float]:
        return {"fork fork bash": median(_times_ms(jobs, _fork_fork_exec))}

    try:
        run_job.apply_async(kwargs={"app": "bench", "sha": sha}).get(timeout=60)  # warm
        figures = in_rounds(rounds, ours, direct, guarded_floor)
    finally:
        worker.stop()
    assert len(store.history("bench", jobs + 1)) >= min(jobs, store.history_limit)
    added = [j - b for j, b in zip(figures["job"], figures["bash"], strict=True)]
    return [
        Row(f"per-job time, {jobs} jobs of `true` per round (median)", figures["job"],
            figures["bash"], "ms", "bash -c true"),
        Row("per-job overhead added (median)", added, None, "ms", "", "<= 5 ms",
            lambda r: r.value <= 5),
        Row("per-job time, against a guarded start's floor", figures["job"],
            figures["fork fork bash"], "ms", "fork, fork, exec bash -c true"),
    ]


def _fork_fork_exec() -> None:
    """The least a guarded job costs: this process (as big as a pool process, with
    Celery and postdeploy loaded) forks a guard, which forks and execs the job."""
    guard = os.fork()
    if guard == 0:
        try:
            job = os.fork()
            if job == 0:
                os.execv("/bin/bash", ["bash", "-c", "true"])
            os.waitpid(job, 0)
        finally:
            os._exit(0)
    os.waitpid(guard, 0)


def _wait_run_of(store: StateStore, sha: str, timeout: float = 60) -> RunRecord:
    """The finished run of ``sha`` (history is capped, so look it up by commit)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        latest = store.latest_run("bench")
        if latest and latest.sha == sha and latest.status not in ("queued", "running"):
            return latest
        time.sleep(0.005)
    raise RuntimeError(f"the run of {sha[:7]} did not finish")
