"""5. Footprint: `postdeploy up` idle (embedded Redis, worker, beat) for a while.

Memory is the proportional set size (shared pages split fairly between forked
processes) of every process `up` started; CPU is their CPU seconds over the idle
window. Baseline: a bare Celery worker (no app, same concurrency) plus a bare
redis-server, measured the same way for the same window. Each round starts
each side afresh (`up` keeps its state directory, so later rounds run no job).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import psutil
import redis

from bench.harness import (
    GitRemote,
    RedisServer,
    Service,
    in_rounds,
    process_tree,
    service_env,
    tree_cpu,
    tree_memory,
)
from bench.report import Row
from postdeploy.store.state import StateStore
from tests.support.core import appspec_yaml, wait_for

MIB = 1024 * 1024
SETTLE = 3.0  # seconds after start-up before an idle window opens


def _idle(processes_of: Service, seconds: float) -> tuple[float, float]:
    procs = process_tree(processes_of)
    cpu0, t0 = tree_cpu(procs), time.monotonic()
    time.sleep(seconds)  # the measurement window itself
    procs = process_tree(processes_of)
    cpu = (tree_cpu(procs) - cpu0) / (time.monotonic() - t0) * 100
    return tree_memory(procs) / MIB, cpu


def measure(root: Path, seconds: float, rounds: int) -> list[Row]:
    """An idle window of ``seconds`` per round for each side; one side runs at a time
    (two at once would share, and so halve, each other's library pages)."""
    root.mkdir(parents=True, exist_ok=True)
    remote = GitRemote(root / "git", "bench")
    remote.commit({"appspec.yaml": appspec_yaml("echo deployed")})
    state = root / "state"

    url_file = state / "redis.url"

    def ours() -> dict[str, float]:
        url_file.unlink(missing_ok=True)  # a previous round's, if its `up` was killed
        env = service_env("", state, 30)
        del env["POSTDEPLOY_REDIS_URL"]
        up = Service(["-m", "postdeploy.cli", "up", "--repo", remote.url, "--name", "bench",
                      "--state-dir", str(state)], env, root / "up.log")
        try:
            wait_for(url_file.exists, 60, what="up's embedded Redis")
            store = StateStore(redis.Redis.from_url(url_file.read_text().strip()))
            wait_for(lambda: (r := store.latest_run("bench")) and r.status == "succeeded", 90,
                     what="the first job")
            time.sleep(SETTLE)  # let it finish starting before the window opens
            memory, cpu = _idle(up, seconds)
        finally:
            up.stop(timeout=20)
        return {"memory": memory, "cpu": cpu}

    def bare() -> dict[str, float]:
        server = RedisServer(root / "baseline-redis", persistent=False).start()
        bare_env = service_env(server.url, state, 30)
        worker = Service(["-m", "celery", "--broker", server.url, "worker", "--concurrency",
                          "2", "--loglevel", "WARNING"], bare_env, root / "bare.log")
        try:
            wait_for(lambda: len(process_tree(worker)) >= 3, 60, what="bare Celery worker")
            time.sleep(SETTLE)
            memory, cpu = _idle(worker, seconds)
            redis_memory = psutil.Process(server.proc.pid).memory_full_info().pss / MIB \
                if server.proc else 0.0
        finally:
            worker.stop()
            server.stop()
        return {"base memory": memory + redis_memory, "base cpu": cpu}

    figures = in_rounds(rounds, ours, bare)
    print(f"    (idle window {seconds:.0f} s per round)", file=sys.stderr)
    return [
        Row(f"`up` idle {seconds:.0f} s: memory (PSS, all processes)", figures["memory"],
            figures["base memory"], "MiB", "bare Celery worker + redis-server",
            "<= 250 MiB", lambda r: r.value <= 250),
        Row(f"`up` idle {seconds:.0f} s: CPU", figures["cpu"], figures["base cpu"],
            "% of a core", "bare Celery worker", "<= 2%", lambda r: r.value <= 2),
    ]
