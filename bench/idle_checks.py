"""1. Idle check cost: a full check cycle with nothing changed, against `git ls-remote`.

The product path: postdeploy.check_commits sent to a real prefork worker
(concurrency 2), fanning out to every app; the cycle ends when every app's
`checked_at` moved. The floor: `git ls-remote` of the same repositories with the
same parallelism (2). What users write by hand: `git fetch && git rev-parse` per repo.
"""

from __future__ import annotations

import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import redis
import yaml

from bench.harness import (
    Service,
    bare_repos,
    celery_client,
    process_tree,
    self_children_cpu,
    service_env,
    tree_cpu,
    wait_ready,
)
from bench.report import Row, median
from postdeploy import keys
from postdeploy.state import StateStore

PARALLELISM = 2  # the worker's prefork concurrency


def measure(root: Path, redis_url: str, count: int, repeats: int) -> list[Row]:
    root.mkdir(parents=True, exist_ok=True)
    repos, sha = bare_repos(root, count)
    names = [f"app-{i}" for i in range(count)]
    config = root / "postdeploy.yaml"
    config.write_text(yaml.safe_dump({"apps": [{"name": n, "repo": str(r)}
                                               for n, r in zip(names, repos, strict=True)]}))
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    store = StateStore(client)
    for name in names:  # nothing changed: every app's commit already ran
        store.observe(name, sha)
        store.mark_done(name, sha, "bench")

    env = service_env(redis_url, root / "state", 3600, POSTDEPLOY_CONFIG=str(config),
                      POSTDEPLOY_LOG_LEVEL="WARNING")
    worker = Service(["-m", "worker"], env, root / "worker.log")
    try:
        wait_ready(worker, client)
        from postdeploy.tasks import check_commits
        celery_client(redis_url, root / "state", POSTDEPLOY_CONFIG=str(config))
        walls, cpus = [], []
        cycles = max(repeats, -(-200 // count))  # enough app checks for 10 ms CPU ticks
        for _ in range(cycles):
            procs = process_tree(worker)
            cpu0, t0, mark = tree_cpu(procs), time.perf_counter(), time.time()
            check_commits.apply_async()
            _wait_all_checked(client, names, mark)
            walls.append(time.perf_counter() - t0)
            cpus.append(tree_cpu(procs) - cpu0)
    finally:
        worker.stop()

    floor_wall, floor_cpu = _parallel(repos, lambda r: ["git", "ls-remote", "--", str(r),
                                                        "HEAD"], cycles)
    clones = _clones(root, repos[:min(count, 200)])
    naive_wall, _ = _parallel(clones, lambda c: ["sh", "-c", f"cd {c} && git fetch -q "
                                                 "&& git rev-parse HEAD"], repeats)
    scale = count / len(clones)  # the naive loop is measured on at most 200 repos
    per_app = sum(cpus) / (cycles * count) * 1000
    floor_per_app = floor_cpu / (cycles * count) * 1000
    label = f"{count} app{'s' if count > 1 else ''}"
    rows = [
        Row(f"idle check cycle, {label}: wall", median(walls), floor_wall, "s",
            "git ls-remote x2"),
        Row(f"idle check cycle, {label}: CPU per app", per_app, floor_per_app, "ms",
            "git ls-remote", "<= 1.5x floor", per_app <= 1.5 * floor_per_app),
        Row(f"idle check cycle, {label}: wall vs hand-written loop", median(walls),
            naive_wall * scale, "s", "git fetch && rev-parse x2"),
    ]
    if count >= 1000:
        rows.append(Row(f"idle check cycle, {label}: inside one 30 s interval",
                        median(walls), 30.0, "s", "interval", "well inside 30 s",
                        median(walls) < 15))
    return rows


def _wait_all_checked(client: redis.Redis, names: list[str], since: float) -> None:
    deadline = time.monotonic() + 600
    pending = set(names)
    while pending and time.monotonic() < deadline:
        batch = list(pending)
        values = client.mget([keys.checked_at(n) for n in batch])
        pending = {n for n, v in zip(batch, values, strict=True) if not v or float(v) < since}
        if pending:
            time.sleep(0.02)
    if pending:
        raise RuntimeError(f"{len(pending)} apps were never checked")


def _parallel(items: list[Path], command: object, repeats: int) -> tuple[float, float]:
    """Median wall time and total CPU seconds of ``repeats`` rounds of ``command(item)``
    over all items, 2 at a time."""
    walls, cpus = [], []
    for _ in range(repeats):
        cpu0, t0 = self_children_cpu(), time.perf_counter()
        with ThreadPoolExecutor(PARALLELISM) as pool:
            list(pool.map(lambda i: subprocess.run(command(i), capture_output=True,  # type: ignore[operator]
                                                   check=True), items))
        walls.append(time.perf_counter() - t0)
        cpus.append(self_children_cpu() - cpu0)
    return median(walls), sum(cpus)


def _clones(root: Path, repos: list[Path]) -> list[Path]:
    clones = []
    for repo in repos:
        target = root / "clones" / repo.name.removesuffix(".git")
        subprocess.run(["git", "clone", "-q", str(repo), str(target)], check=True,
                       capture_output=True)
        clones.append(target)
    return clones
