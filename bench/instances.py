"""Instance reports: what every host's reports cost per interval, against a check cycle.

Three real workers, each with its own POSTDEPLOY_HOST, serve the same 100 ``repo``
apps on one Redis (no beat: the only periodic work is each worker's host loop,
which reports 100 instances and places their runs every interval). Measured:
the CPU of all three workers' process trees over ten intervals, per interval,
against the CPU of one idle check cycle of the same 100 apps
(`postdeploy.check_commits`, every app's `git ls-remote`) in the same workers.
Self-contained: its own repositories, workers and Redis database.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import psutil
import redis
import yaml

from bench.harness import settled_store, tree_cpu
from bench.report import Row
from postdeploy.config.settings import Settings
from postdeploy.store import keys
from postdeploy.store.celery_app import configure
from tests.support.core import GitRemote, Service, service_env, wait_for

HOSTS = 3
INTERVAL = 2.0  # seconds between reports; short, so the window holds many of them
WINDOW_INTERVALS = 10  # intervals measured per round (half in a quick run)
CYCLES = 3  # idle check cycles per round
TARGET = 0.2  # reports may add at most 20 % to an idle check cycle


def measure(root: Path, redis_url: str, count: int = 100, rounds: int = 3,
            quick: bool = False) -> list[Row]:
    root.mkdir(parents=True, exist_ok=True)
    names, sha = _apps(root, count)
    client = settled_store(redis_url, names, sha).client  # every commit already ran

    window = WINDOW_INTERVALS // 2 if quick else WINDOW_INTERVALS
    reports, cycles = [], []
    workers = []
    try:
        for index in range(HOSTS):
            env = service_env(redis_url, root / f"state-{index}", INTERVAL,
                              POSTDEPLOY_CONFIG=str(root / "postdeploy.yaml"),
                              POSTDEPLOY_HOST=f"host-{index}", POSTDEPLOY_LOG_LEVEL="WARNING")
            workers.append(Service(["-m", "worker"], env, root / f"worker-{index}.log"))
        wait_for(lambda: _reported(client, names) == HOSTS * count, 120, 0.2,
                 what="every host to report every app")
        time.sleep(INTERVAL)  # let start-up work settle before measuring

        settings = Settings.load({"POSTDEPLOY_REDIS_URL": redis_url,
                                  "POSTDEPLOY_STATE_DIR": str(root / "client"),
                                  "POSTDEPLOY_CONFIG": str(root / "postdeploy.yaml")})
        configure(settings, redis_url)
        from postdeploy.services.tasks import check_commits

        procs = _trees(workers)
        for _ in range(rounds):
            cpu0, t0 = tree_cpu(procs), time.monotonic()
            time.sleep(INTERVAL * window)
            rate = (tree_cpu(procs) - cpu0) / (time.monotonic() - t0)  # CPU s per second
            reports.append(rate * INTERVAL * 1000)

            cpu0, t0 = tree_cpu(procs), time.monotonic()
            for _ in range(CYCLES):
                mark = time.time()
                check_commits.apply_async()
                _wait_checked(client, names, mark)
            wall = time.monotonic() - t0
            # The reports go on meanwhile: take their share out of the cycles' CPU.
            cycles.append((tree_cpu(procs) - cpu0 - rate * wall) / CYCLES * 1000)
    finally:
        for worker in workers:
            worker.stop()
    return [Row(f"instance reports, {HOSTS} hosts x {count} apps: CPU per interval", reports,
                cycles, "ms", f"idle check cycle, {count} apps", f"<= {TARGET:.1f}x baseline",
                lambda r: (r.ratio or 0) <= TARGET)]


def _apps(root: Path, count: int) -> tuple[list[str], str]:
    template = GitRemote(root / "template", "app")
    sha = template.commit({"appspec.yaml": "envs: []\n", "README": "bench\n"})
    names, apps = [], []
    for index in range(count):
        target = root / "repos" / f"app-{index}.git"
        shutil.copytree(template.bare, target)
        names.append(f"app-{index}")
        apps.append({"name": names[-1], "repo": str(target)})
    (root / "postdeploy.yaml").write_text(yaml.safe_dump({"apps": apps}))
    return names, sha


def _reported(client: redis.Redis, names: list[str]) -> int:
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.hlen(keys.instances(name))
    return sum(pipe.execute())


def _wait_checked(client: redis.Redis, names: list[str], since: float) -> None:
    def all_checked() -> bool:
        values = client.mget([keys.checked_at(n) for n in names])
        return all(v and float(v) >= since for v in values)
    wait_for(all_checked, 600, 0.02, what="a full check cycle")


def _trees(workers: list[Service]) -> list[psutil.Process]:
    procs: list[psutil.Process] = []
    for worker in workers:
        root = psutil.Process(worker.proc.pid)
        procs += [root, *root.children(recursive=True)]
    return procs
