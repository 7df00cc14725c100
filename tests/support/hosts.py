"""Several simulated hosts on this one machine, sharing one Redis.

Each :class:`Host` has its own POSTDEPLOY_HOST, state directory, working copy
(a clone of one origin, for a ``path`` app), a small HTTP stand-in for the
app's health endpoint that answers with the version it serves, and its own PID
namespace (``unshare --pid --mount-proc``): one host cannot see or kill another's
processes, and "rebooting" a host ends every process it had, daemons included.
The worker is started inside the namespace with ``nsenter``, so stopping only
the worker (an executor restart) leaves the host's other processes running.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path

import psutil
import redis
import yaml

from postdeploy.store import keys
from tests.support.core import GitRemote, run_git, service_env, wait_for
from tests.support.standin import AppStandIn


def namespaces_work() -> str | None:
    """None if PID namespaces can be made here, else why not (for pytest.skip)."""
    if shutil.which("unshare") is None or shutil.which("nsenter") is None:
        return "unshare/nsenter (util-linux) not installed"
    try:
        result = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare failed: {exc}"
    if result.returncode != 0:
        return f"PID namespaces are not permitted here: {result.stderr.strip()[:200]}"
    return None


class Machine:
    """A PID namespace standing for one host's machine: its init holds it open."""

    def __init__(self) -> None:
        self.holder = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child",
             "sleep", "infinity"], start_new_session=True)
        self.init_pid = wait_for(lambda: _child(self.holder.pid), 10,
                                 what="the namespace's init")

    def enter(self) -> list[str]:
        """Prefix for a command that must run on this machine."""
        return ["nsenter", "--target", str(self.init_pid), "--pid", "--mount", "--"]

    def power_off(self) -> None:
        """Every process of the machine ends at once (its init dies)."""
        if self.holder.poll() is None:
            self.holder.kill()  # --kill-child: the init gets SIGKILL, the namespace goes
            self.holder.wait(10)
        wait_for(lambda: not psutil.pid_exists(self.init_pid)
                 or psutil.Process(self.init_pid).status() == psutil.STATUS_ZOMBIE, 10,
                 what="the machine to power off")


class HostWorker:
    """`python -m worker` started inside a Machine; its log in a file."""

    def __init__(self, machine: Machine, env: Mapping[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen([*machine.enter(), sys.executable, "-m", "worker"],
                                     env=dict(env), stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        # nsenter forks into the namespace: the worker is its child.
        self.pid = wait_for(lambda: _child(self.proc.pid), 10, what="the worker process")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            for proc in _tree(self.pid):
                proc.kill()
            self.proc.wait(10)
        self._log.close()


class Host:
    """One simulated app server: working copy, health stand-in, machine, worker."""

    def __init__(self, name: str, root: Path, origin: GitRemote, redis_url: str,
                 interval: float, app: str = "shop", kind: str = "path",
                 extra_env: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.dir = root / name
        self.dir.mkdir(parents=True)
        self.origin = origin
        self.app = app
        self.kind = kind
        self.workdir = self.dir / app
        run_git(self.dir, "clone", "-q", origin.url, str(self.workdir))
        self.standin = AppStandIn(version=self.head())
        self.boot_id = uuid.uuid4().hex
        config = {"apps": [{"name": app, "path": str(self.workdir)} if kind == "path"
                           else {"name": app, "repo": origin.url}]}
        (self.dir / "postdeploy.yaml").write_text(yaml.safe_dump(config))
        self.env = service_env(redis_url, self.dir / "state", interval,
                               POSTDEPLOY_HOST=name, POSTDEPLOY_CONFIG=str(
                                   self.dir / "postdeploy.yaml"),
                               APP_PORT=str(self.standin.port), **(extra_env or {}))
        self.machine: Machine | None = None
        self.worker: HostWorker | None = None
        self._starts = 0

    def head(self) -> str:
        return run_git(self.workdir, "rev-parse", "HEAD").strip()

    def pull(self, sha: str | None = None) -> str:
        """The deploy's git step: the working copy moves to ``sha`` (default: origin's).

        A running worker has first reported the head it leaves, as on a real host
        that served before its deploy: a host's first report is never a move (see
        docs/hosts.md), and on a busy machine a worker may start late."""
        if self.worker is not None and self.kind == "path":
            head, client = self.head(), redis.Redis.from_url(self.env["POSTDEPLOY_REDIS_URL"])
            wait_for(lambda: client.hget(keys.host_heads(self.app), self.name) == head.encode(),
                     30, what=f"{self.name}'s report of {head[:7]}")
        run_git(self.workdir, "fetch", "-q", "origin")
        run_git(self.workdir, "reset", "-q", "--hard", sha or f"origin/{self.origin.branch}")
        return self.head()

    def serve(self, sha: str | None = None) -> None:
        """The deploy's restart step: the app now answers with ``sha`` (default: HEAD)."""
        self.standin.version = sha or self.head()

    def start(self, boot_id: str | None = None) -> HostWorker:
        """Start the worker (booting the machine first if it is off)."""
        if self.machine is None:
            self.machine = Machine()
        self.boot_id = boot_id or self.boot_id
        self._starts += 1
        env = {**self.env, "POSTDEPLOY_BOOT_ID": self.boot_id}
        self.worker = HostWorker(self.machine, env,
                                 self.dir / f"worker-{self._starts}.log")
        return self.worker

    def stop_worker(self, sig: int = signal.SIGTERM) -> None:
        if self.worker is not None:
            self.worker.stop(sig)
            self.worker = None

    def reboot(self) -> None:
        """Power off (every process ends) and start again with a new boot id."""
        self.power_off()
        self.start(uuid.uuid4().hex)

    def power_off(self) -> None:
        if self.machine is not None:
            self.machine.power_off()
            self.machine = None
        if self.worker is not None:
            self.worker.proc.wait(10)
            self.worker._log.close()
            self.worker = None

    def close(self) -> None:
        self.stop_worker()
        self.power_off()
        self.standin.close()


class Fleet:
    """The hosts of one test; all are shut down at the end."""

    def __init__(self, root: Path, origin: GitRemote, redis_url: str,
                 interval: float = 1.0) -> None:
        self.root = root
        self.origin = origin
        self.redis_url = redis_url
        self.interval = interval
        self.hosts: dict[str, Host] = {}

    def add(self, name: str, **options: object) -> Host:
        host = Host(name, self.root, self.origin, self.redis_url, self.interval,
                    **options)  # type: ignore[arg-type]
        self.hosts[name] = host
        return host

    def close(self) -> None:
        for host in self.hosts.values():
            host.close()


def _child(pid: int) -> int | None:
    try:
        children = psutil.Process(pid).children()
    except psutil.Error:
        return None
    return children[0].pid if children else None


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [*root.children(recursive=True), root]
    except psutil.Error:
        return []
