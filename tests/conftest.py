"""Fixtures giving every test real parts: a private, flushed redis-server and git repos.

Set POSTDEPLOY_TEST_REDIS_URL to run the suite against another Redis as well;
tests that kill or restart Redis always use a private server.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis

from tests.support.core import GitRemote, RedisServer, Service, service_env
from tests.support.hosts import Fleet, namespaces_work

EXTERNAL_REDIS = os.environ.get("POSTDEPLOY_TEST_REDIS_URL")
# Run as root (as CI does), workers run every job as its app's unprivileged user
# (a passwd user, or a dynamic uid of the app's own), as in production.
AS_ROOT = os.geteuid() == 0
APP_USERS = ("pdtest-shop", "pdtest-blog")  # real users that tests' apps run as


def pytest_configure(config: pytest.Config) -> None:
    """As root, temp dirs of our own below /tmp that jobs run as the job user can reach.

    pytest keeps its own (/tmp/pytest-of-root) private to root, and may reset it at the
    start of any session; ours is traversable (not listable) and private to this session.
    """
    if AS_ROOT and not config.option.basetemp:
        base = Path(tempfile.mkdtemp(prefix="postdeploy-tests-"))
        config.option.basetemp = str(base)
        config.stash[_OWN_BASETEMP] = base


def _is_xdist_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def pytest_sessionstart(session: pytest.Session) -> None:
    """As root, the real passwd users that tests' apps run as, made once per run (by
    the controller when pytest-xdist runs the tests in several processes)."""
    if AS_ROOT and not _is_xdist_worker(session.config):
        session.config.stash[_MADE_USERS] = _make_users(APP_USERS)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _is_xdist_worker(session.config):
        return
    _remove_users(session.config.stash.get(_MADE_USERS, []))
    base = session.config.stash.get(_OWN_BASETEMP, None)
    if base is not None and exitstatus == 0:  # keep the logs of a failed session
        shutil.rmtree(base, ignore_errors=True)


_OWN_BASETEMP = pytest.StashKey[Path]()
_MADE_USERS = pytest.StashKey[list[str]]()


def _make_users(names: tuple[str, ...]) -> list[str]:
    """Make those of ``names`` that do not exist yet; the ones made."""
    made = []
    for name in names:
        try:
            pwd.getpwnam(name)
        except KeyError:
            subprocess.run(["useradd", "--create-home", "--user-group", "--shell",
                            "/bin/bash", name], capture_output=True, check=False)
            try:
                pwd.getpwnam(name)
            except KeyError:
                continue  # app_users says why tests that need it cannot run
            made.append(name)
    return made


def _remove_users(names: list[str]) -> None:
    """Remove users this run made, with their homes and processes, whatever the tests did."""
    for name in names:
        subprocess.run(["pkill", "-KILL", "-u", name], capture_output=True, check=False)
        subprocess.run(["userdel", "--remove", name], capture_output=True, check=False)


@pytest.fixture(scope="session", autouse=True)
def _temp_dirs_reachable_by_jobs(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Jobs (the job user) leave journals and pid files in the tests' temp dirs."""
    if not AS_ROOT:
        return
    base = tmp_path_factory.getbasetemp()
    base.chmod(0o711)  # pytest made it private: traverse only
    if "PYTEST_XDIST_WORKER" in os.environ:
        base.parent.chmod(0o711)  # the run's own, each pytest-xdist process works below it
    make = tmp_path_factory.mktemp

    def mktemp(basename: str, numbered: bool = True) -> Path:
        path = make(basename, numbered)
        path.chmod(0o1777)  # like /tmp: anyone may add files, only their owner removes them
        return path

    tmp_path_factory.mktemp = mktemp  # type: ignore[method-assign]




@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer, worker_id: str) -> str:
    """A flushed Redis for this test (the external one when configured: a database of
    its own for each pytest-xdist process, which flushes only its own)."""
    url = EXTERNAL_REDIS or redis_server.url
    if EXTERNAL_REDIS and worker_id.startswith("gw"):
        parts = urlsplit(EXTERNAL_REDIS)
        db = int(parts.path.strip("/") or 0) + int(worker_id.removeprefix("gw"))
        url = urlunsplit(parts._replace(path=f"/{db}"))
    redis.Redis.from_url(url).flushdb()
    return url


@pytest.fixture
def rclient(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


@pytest.fixture
def remote(tmp_path: Path) -> GitRemote:
    return GitRemote(tmp_path / "git")


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Callable[..., Service]]:
    """Start `python -m worker|beat` processes; all are stopped after the test."""
    started: list[Service] = []

    def start(module: str, env: dict[str, str], name: str | None = None) -> Service:
        log = tmp_path / f"{name or module}-{len(started)}.log"
        service = Service(["-m", module], env, log)
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop()


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def env_for(redis_url: str, state_dir: Path) -> Callable[..., dict[str, str]]:
    def make(remote: GitRemote, interval: float = 1.0, **extra: str) -> dict[str, str]:
        return service_env(redis_url, state_dir, interval, POSTDEPLOY_REPO=remote.url,
                           POSTDEPLOY_APP="shop", **extra)
    return make


@pytest.fixture
def fleet(tmp_path: Path, remote: GitRemote, redis_url: str) -> Iterator[Fleet]:
    """Simulated hosts (tests/hosts.py) sharing this test's Redis and origin repo."""
    reason = namespaces_work()
    if reason:
        pytest.skip(reason)
    hosts = Fleet(tmp_path / "hosts", remote, redis_url)
    yield hosts
    hosts.close()


@pytest.fixture(scope="session")
def app_users() -> tuple[str, ...]:
    """Real passwd users with a home, for apps' ``user:`` (root only); made at the start
    of the run and removed at its end (see pytest_sessionstart), unless they were
    there before."""
    if not AS_ROOT:
        pytest.skip("making users and switching to them needs root")
    for name in APP_USERS:
        try:
            pwd.getpwnam(name)
        except KeyError:
            pytest.fail(f"useradd could not make the test user {name!r}")
    return APP_USERS
