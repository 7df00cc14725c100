"""The fault suite: every test causes real faults and records what survived.

A test wraps each fault in ``with fault("name") as f:`` and sets ``f.audit`` from the
run history (see harness.audit); a fault survived when its block ended without an
assertion failing. At the end of the session one line sums them up:
"N faults tried, N survived, L runs lost, D duplicated", where "runs lost" counts
commits that should have run and never completed, and "duplicated" counts extra
completed automatic runs of one commit. Measurements (peak RSS, durations) that
tests ``report`` are printed above it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from tests.faults.harness import Audit, worker_ready
from tests.support.core import GitRemote, RedisServer, Service, service_env, wait_for


@dataclass
class Fault:
    name: str
    survived: bool = False
    audit: Audit | None = None


@dataclass
class Tally:
    faults: list[Fault] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)

    def summary(self) -> str:
        tried = len(self.faults)
        survived = sum(1 for f in self.faults if f.survived)
        lost = sum(f.audit.lost for f in self.faults if f.audit)
        duplicated = sum(f.audit.duplicated for f in self.faults if f.audit)
        return (f"{tried} faults tried, {survived} survived, {lost} runs lost, "
                f"{duplicated} duplicated")


TALLY = Tally()
FaultScope = Callable[[str], AbstractContextManager[Fault]]


@pytest.fixture
def fault() -> FaultScope:
    """``with fault("redis restart mid-job") as f: ...``; set ``f.audit`` inside."""

    @contextmanager
    def scope(name: str) -> Iterator[Fault]:
        record = Fault(name)
        TALLY.faults.append(record)
        yield record
        # Reached only when the block raised nothing; a fault with lost or duplicated
        # runs did not survive even if the test chose not to assert on it.
        record.survived = record.audit is None or (
            record.audit.lost == 0 and record.audit.duplicated == 0)

    return scope


@pytest.fixture
def report() -> Callable[[str], None]:
    """Add a measurement line to the end-of-session summary."""
    return TALLY.figures.append


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Start private redis-servers (persistent or not, with a password) we may kill."""
    started: list[RedisServer] = []

    def start(persistent: bool = True, password: str | None = None) -> RedisServer:
        server = RedisServer(tmp_path / f"redis-{len(started)}", persistent=persistent,
                             password=password).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@dataclass
class Executor:
    """A private Redis (a test may stop, start or wipe it) and the worker and beat on it."""

    server: RedisServer
    client: redis.Redis
    env: dict[str, str]
    services: Callable[..., Service]
    workers: list[Service] = field(default_factory=list)
    beats: list[Service] = field(default_factory=list)

    @property
    def worker(self) -> Service:
        """The worker started last."""
        return self.workers[-1]

    @property
    def beat(self) -> Service:
        return self.beats[-1]

    def start(self, tag: str = "", beat: bool = True, wait_ready: bool = False,
              **overrides: str) -> Service:
        """Start a worker (and a beat) on this Redis; ``overrides`` change its settings."""
        env = {**self.env, **overrides}
        worker = self.services("worker", env, f"worker{tag}")
        self.workers.append(worker)
        if beat:
            self.beats.append(self.services("beat", env, f"beat{tag}"))
        if wait_ready:
            wait_for(lambda: worker_ready(worker), 30, what="worker ready")
        return worker


@pytest.fixture
def executor(tmp_path: Path, request: pytest.FixtureRequest,
             private_redis: Callable[..., RedisServer],
             services: Callable[..., Service]) -> Callable[..., Executor]:
    """``executor(...)``: a private Redis, settings for app ``shop`` (the ``remote``
    fixture's repo unless ``repo`` or POSTDEPLOY_CONFIG is given) and, unless
    ``start=False``, a worker and a beat. Commit what the first check must see first."""

    def make(interval: float = 1.0, persistent: bool = True, password: str | None = None,
             repo: str | None = None, start: bool = True, wait_ready: bool = False,
             **settings: str) -> Executor:
        server = private_redis(persistent=persistent, password=password)
        app: dict[str, str] = {}
        if "POSTDEPLOY_CONFIG" not in settings:
            if repo is None:
                remote: GitRemote = request.getfixturevalue("remote")
                repo = remote.url
            app = {"POSTDEPLOY_REPO": repo, "POSTDEPLOY_APP": "shop"}
        env = service_env(server.url, tmp_path / "state", interval, **app, **settings)
        made = Executor(server, server.client(), env, services)
        if start:
            made.start(wait_ready=wait_ready)
        return made

    return make


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not TALLY.faults:
        return
    terminalreporter.section("fault suite")
    for line in TALLY.figures:
        terminalreporter.write_line(line)
    for record in TALLY.faults:
        state = "survived" if record.survived else "NOT survived"
        audit = (f" (lost {record.audit.lost}, duplicated {record.audit.duplicated})"
                 if record.audit else "")
        terminalreporter.write_line(f"  {record.name}: {state}{audit}")
    terminalreporter.write_line(TALLY.summary())
