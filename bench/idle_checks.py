"""1. Idle check cost: a full check cycle with nothing changed, against `git ls-remote`.

The product path: postdeploy.check_commits sent to a real prefork worker
(concurrency 2), fanning out to every app; the cycle ends when every app's
`checked_at` moved. The floor: `git ls-remote` of the same repositories with the
same parallelism (2). What users write by hand: `git fetch && git rev-parse` per repo.
Each round runs enough cycles for 200 app checks; the three take turns going first.
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
    in_rounds,
    process_tree,
    self_children_cpu,
    service_env,
    settled_store,
    tree_cpu,
    wait_ready,
)
from bench.report import Row, median
from postdeploy.store import keys

PARALLELISM = 2  # the worker's prefork concurrency


def measure(root: Path, redis_url: str, count: int, rounds: int) -> list[Row]:
    root.mkdir(parents=True, exist_ok=True)
    repos, sha = bare_repos(root, count)
    names = [f"app-{i}" for i in range(count)]
    config = root / "postdeploy.yaml"
    config.write_text(yaml.safe_dump({"apps": [{"name": n, "repo": str(r)}
                                               for n, r in zip(names, repos, strict=True)]}))
    client = settled_store(redis_url, names, sha).client  # every commit already ran
    clones = _clones(root, repos[:min(count, 200)])
    cycles = -(-200 // count)  # cycles per round: enough app checks for 10 ms CPU ticks

    env = service_env(redis_url, root / "state", 3600, POSTDEPLOY_CONFIG=str(config),
                      POSTDEPLOY_LOG_LEVEL="WARNING")
    worker = Service(["-m", "worker"], env, root / "worker.log")
    try:
        wait_ready(worker, client)
        from postdeploy.services.tasks import check_commits
        celery_client(redis_url, root / "state", POSTDEPLOY_CONFIG=str(config))

        def ours() -> dict[str, float]:
            walls, cpu = [], 0.0
            for _ in range(cycles):
                procs = process_tree(worker)
                cpu0, t0, mark = tree_cpu(procs), time.perf_counter(), time.time()
                check_commits.apply_async()
                _wait_all_checked(client, names, mark)
                walls.append(time.perf_counter() - t0)
                cpu += tree_cpu(procs) - cpu0
            return {"wall": median(walls), "cpu": cpu / (cycles * count) * 1000}

        def floor() -> dict[str, float]:
            wall, cpu = _parallel(repos, lambda r: ["git", "ls-remote", "--", str(r), "HEAD"],
                                  cycles)
            return {"floor wall": wall, "floor cpu": cpu / (cycles * count) * 1000}

        def by_hand() -> dict[str, float]:
            # Measured on at most 200 clones, scaled to the fleet.
            wall, _ = _parallel(clones, lambda c: ["sh", "-c", f"cd {c} && git fetch -q "
                                                   "&& git rev-parse HEAD"], 1)
            return {"naive wall": wall * count / len(clones)}

        figures = in_rounds(rounds, ours, floor, by_hand)
    finally:
        worker.stop()

    label = f"{count} app{'s' if count > 1 else ''}"
    rows = [
        Row(f"idle check cycle, {label}: wall", figures["wall"], figures["floor wall"], "s",
            "git ls-remote x2"),
        Row(f"idle check cycle, {label}: CPU per app", figures["cpu"], figures["floor cpu"],
            "ms", "git ls-remote", "<= 1.5x floor", lambda r: (r.ratio or 0) <= 1.5),
        Row(f"idle check cycle, {label}: wall vs hand-written loop", figures["wall"],
            figures["naive wall"], "s", "git fetch && rev-parse x2"),
    ]
    if count >= 1000:
        rows.append(Row(f"idle check cycle, {label}: inside one 30 s interval",
                        figures["wall"], [30.0] * rounds, "s", "interval",
                        "well inside 30 s", lambda r: r.value < 15))
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
