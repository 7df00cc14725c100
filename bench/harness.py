"""Real parts for benchmarks: the same private redis-server, git repos and processes as tests."""

from __future__ import annotations

import os
import shutil
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import redis

from postdeploy.config.settings import Settings
from postdeploy.store.celery_app import configure
from postdeploy.store.state import StateStore
from tests.support.core import GitRemote, RedisServer, Service, run_git, service_env, wait_for

__all__ = ["GitRemote", "RedisServer", "Service", "run_git", "service_env", "wait_for",
           "bare_repos", "celery_client", "settled_store", "tree_cpu", "tree_memory",
           "redis_server", "process_tree", "Step", "in_rounds"]

# One round of one side of a comparison: its figures by name ({"wall": 0.21, ...}).
Step = Callable[[], dict[str, float]]


def in_rounds(rounds: int, *steps: Step) -> dict[str, list[float]]:
    """Run every step once per round; each figure's values, one per round.

    Steps take turns going first (ours, baseline; then baseline, ours; ...), so a
    machine that gets busier or quieter during the run favours neither side, and
    each round's pair is measured under the same load.
    """
    figures: dict[str, list[float]] = defaultdict(list)
    for index in range(rounds):
        for step in (steps if index % 2 == 0 else steps[::-1]):
            for name, value in step().items():
                figures[name].append(value)
    return dict(figures)


@contextmanager
def redis_server(root: Path) -> Iterator[RedisServer]:
    server = RedisServer(root / "redis", persistent=False).start()
    try:
        yield server
    finally:
        server.stop()


def bare_repos(root: Path, count: int) -> tuple[list[Path], str]:
    """``count`` identical bare repositories with one commit; returns them and the sha."""
    template = GitRemote(root / "template", "app")
    sha = template.commit({"appspec.yaml": "envs: []\n", "README": "bench\n"})
    repos = []
    for index in range(count):
        target = root / "repos" / f"app-{index}.git"
        shutil.copytree(template.bare, target)
        repos.append(target)
    return repos, sha


def celery_client(redis_url: str, state_dir: Path, **env: str) -> Settings:
    """Configure this process's Celery app to send tasks to the benchmark's Redis."""
    settings = Settings.load({"POSTDEPLOY_REDIS_URL": redis_url,
                              "POSTDEPLOY_STATE_DIR": str(state_dir), **env})
    configure(settings, redis_url)
    return settings


def process_tree(service: Service) -> list[psutil.Process]:
    """The service's process and all its descendants now."""
    root = psutil.Process(service.proc.pid)
    return [root, *root.children(recursive=True)]


def settled_store(redis_url: str, names: list[str], sha: str) -> StateStore:
    """A flushed Redis where every app's commit ``sha`` already ran: checks find nothing."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    store = StateStore(client)
    for name in names:
        seen = store.observe(name, sha, None)
        store.mark_done(name, seen.deployment.id, "bench")
    return store


def tree_cpu(processes: list[psutil.Process]) -> float:
    """CPU seconds used by these processes and their reaped children."""
    total = 0.0
    for proc in processes:
        try:
            t = proc.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


def tree_memory(processes: list[psutil.Process]) -> float:
    """Proportional set size (shared pages split fairly) in bytes."""
    total = 0.0
    for proc in processes:
        try:
            total += proc.memory_full_info().pss
        except psutil.Error:
            continue
    return total


def wait_ready(service: Service, client: redis.Redis, timeout: float = 60) -> None:
    """A worker registers its apps in Redis once it is ready (whatever the log level)."""
    from postdeploy.store import keys
    wait_for(lambda: client.exists(keys.APPS) or not service.alive(), timeout,
             what="worker ready")
    if not service.alive():
        raise RuntimeError(f"worker exited:\n{service.log()[-2000:]}")


def self_children_cpu() -> float:
    usage = os.times()
    return usage.children_user + usage.children_system
