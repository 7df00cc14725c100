"""The job guard on real processes: escaped descendants, fencing, cancel, job user, sandbox."""

from __future__ import annotations

import os
import select
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from postdeploy.config.users import parse_user
from postdeploy.run.guard import GuardHandle, GuardResult, GuardSpec, Lease, start_guard
from postdeploy.run.sandbox import Sandbox, can_isolate
from postdeploy.run.stop import Stop, StopKind
from tests.support.core import RedisServer, process_alive, wait_for

ROOT = os.geteuid() == 0


def _connect(url: str) -> Callable[[], redis.Redis]:
    return lambda: redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)


class Job:
    """A guarded job with its output pipe read by the test, as a worker would."""

    def __init__(self, command: str, cwd: Path, grace: float = 1.0,
                 lease: Lease | None = None, sandbox: Sandbox | None = None) -> None:
        read_end, write_end = os.pipe()
        env = {"PATH": os.environ["PATH"], "HOME": str(cwd)}
        spec = GuardSpec(command=command, cwd=str(cwd), env=env, grace=grace, lease=lease,
                         sandbox=sandbox or Sandbox())
        self.handle: GuardHandle = start_guard(spec, write_end)
        os.close(write_end)
        self.output = b""
        self._fd = read_end

    def read(self, wait: float = 0.1) -> None:
        if self._fd >= 0 and select.select([self._fd], [], [], wait)[0]:
            chunk = os.read(self._fd, 65536)
            if chunk:
                self.output += chunk
            else:
                os.close(self._fd)
                self._fd = -1

    def result(self, timeout: float = 20) -> GuardResult:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.read(0.05)
            if self.handle.poll(0.05) is not None:
                return self.handle.result  # type: ignore[return-value]
        raise AssertionError(f"no result after {timeout} s; output {self.output!r}")

    def finish(self) -> None:
        self.handle.finish()
        if self._fd >= 0:
            os.close(self._fd)


def test_exit_code_and_output(tmp_path: Path) -> None:
    job = Job("echo hello; echo oops >&2; exit 3", tmp_path)
    result = job.result()
    job.read()
    job.finish()
    assert result == GuardResult(3, None)
    assert job.output.splitlines() == [b"hello", b"oops"]


def test_stop_reaches_escaped_descendants(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    # setsid, a double fork and `env -i`: none of them stays in the job's group or env.
    command = (f"setsid sleep 1000 & echo $! >> {pids}; "
               f"(sleep 1000 & echo $! >> {pids}) ; "
               f"env -i /bin/sh -c 'trap \"\" TERM; echo $$ >> {pids}; exec sleep 1000' & "
               "trap '' TERM; while true; do sleep 0.1; done")
    job = Job(command, tmp_path, grace=1)
    wait_for(lambda: pids.exists() and len(pids.read_text().split()) == 3, 10,
             what="three escaped processes")
    job.handle.stop("timeout")
    result = job.result()
    job.finish()
    assert result.stopped == Stop(StopKind.ASKED, "timeout")
    for pid in map(int, pids.read_text().split()):
        wait_for(lambda pid=pid: not process_alive(pid), 5, what=f"process {pid} to die")


def test_daemons_of_a_finished_job_are_left_alone(tmp_path: Path) -> None:
    pidfile = tmp_path / "daemon.pid"
    job = Job(f"setsid sleep 300 > /dev/null 2>&1 & echo $! > {pidfile}", tmp_path)
    result = job.result()
    job.finish()
    assert result.exit_code == 0
    daemon = int(pidfile.read_text())
    try:
        assert process_alive(daemon)
    finally:
        os.kill(daemon, 9)


def test_worker_death_stops_the_job(tmp_path: Path) -> None:
    pidfile = tmp_path / "job.pid"
    job = Job(f"echo $$ > {pidfile}; exec sleep 1000", tmp_path)
    wait_for(pidfile.exists, 10, what="job start")
    os.close(job.handle._control)  # what the kernel does when the worker dies
    job.handle._control = -1
    result = job.result()
    assert result.stopped == Stop(StopKind.WORKER_GONE, "its worker stopped")
    assert not process_alive(int(pidfile.read_text()))
    job.finish()


@pytest.fixture
def private_redis(tmp_path: Path) -> RedisServer:
    server = RedisServer(tmp_path / "redis").start()
    yield server  # type: ignore[misc]
    server.stop()


def test_lease_is_renewed_and_cancel_arrives(tmp_path: Path,
                                             private_redis: RedisServer) -> None:
    client = redis.Redis.from_url(private_redis.url)
    client.set("lock", "tok", px=2000)
    lease = Lease(_connect(private_redis.url), "lock", "tok", ttl=2.0, claim_key="claim",
                  cancel_key="cancel")
    job = Job("sleep 1000", tmp_path, lease=lease)
    time.sleep(3)  # longer than the lease: only the guard keeps it
    assert client.get("lock") == b"tok" and client.get("claim") == b"running"
    client.set("cancel", "from the CLI by tester")
    result = job.result(10)
    assert result.stopped == Stop(StopKind.CANCELLED, "cancelled from the CLI by tester")
    assert client.get("lock") == b"tok"  # held until the worker has recorded the run
    job.finish()
    wait_for(lambda: client.pttl("lock") < 2000, 5, what="renewals to stop")


def test_fencing_stops_the_job_before_the_lease_runs_out(tmp_path: Path,
                                                          private_redis: RedisServer) -> None:
    client = redis.Redis.from_url(private_redis.url)
    client.set("lock", "tok", px=4000)
    pidfile = tmp_path / "job.pid"
    lease = Lease(_connect(private_redis.url), "lock", "tok", ttl=4.0)
    job = Job(f"echo $$ > {pidfile}; trap '' TERM; while true; do sleep 0.1; done",
              tmp_path, grace=30, lease=lease)
    wait_for(pidfile.exists, 10, what="job start")
    private_redis.stop()  # a partition from Redis: no renewal from now on
    lost_at = time.monotonic()
    result = job.result(10)
    assert result.stopped is not None and result.stopped.kind == StopKind.LEASE_LOST
    # Stopped (SIGKILL despite the 30 s grace) before the 4 s lease could lapse.
    assert time.monotonic() - lost_at < 4.0
    assert not process_alive(int(pidfile.read_text()))
    job.finish()


def test_taken_lease_stops_the_job(tmp_path: Path, private_redis: RedisServer) -> None:
    client = redis.Redis.from_url(private_redis.url)
    client.set("lock", "tok", px=5000)
    pidfile = tmp_path / "job.pid"
    job = Job(f"echo $$ > {pidfile}; exec sleep 1000", tmp_path,
              lease=Lease(_connect(private_redis.url), "lock", "tok", 5.0))
    wait_for(pidfile.exists, 10, what="job start")
    client.set("lock", "someone-else")
    result = job.result(10)
    job.finish()
    assert result.stopped == Stop(StopKind.LEASE_LOST,
                                 "lease lost (another run took the app's run lock)")


def test_a_lapsed_lease_taken_and_released_since_is_not_put_back(
        tmp_path: Path, private_redis: RedisServer) -> None:
    client = redis.Redis.from_url(private_redis.url)
    client.set("lock", "1", px=5000)
    client.set("lock:fence", "1")
    pidfile = tmp_path / "job.pid"
    job = Job(f"echo $$ > {pidfile}; exec sleep 1000", tmp_path,
              lease=Lease(_connect(private_redis.url), "lock", "1", 5.0))
    wait_for(pidfile.exists, 10, what="job start")
    client.set("lock:fence", "2")  # another run took the lock (token 2) and let it go
    client.delete("lock")
    result = job.result(10)
    job.finish()
    assert result.stopped == Stop(StopKind.LEASE_LOST,
                                 "lease lost (another run took the app's run lock)")
    assert client.get("lock") is None


def test_a_lock_lost_with_redis_data_is_put_back(tmp_path: Path,
                                                private_redis: RedisServer) -> None:
    client = redis.Redis.from_url(private_redis.url)
    client.set("lock", "7", px=5000)
    client.set("lock:fence", "7")
    pidfile = tmp_path / "job.pid"
    job = Job(f"echo $$ > {pidfile}; exec sleep 1000", tmp_path,
              lease=Lease(_connect(private_redis.url), "lock", "7", 5.0))
    wait_for(pidfile.exists, 10, what="job start")
    client.flushdb()  # a restart without persistence
    wait_for(lambda: client.get("lock") == b"7" and client.get("lock:fence") == b"7", 5,
             what="the guard to put its lock and the counter back")
    job.handle.stop("timeout")
    assert job.result(10).stopped == Stop(StopKind.ASKED, "timeout")
    job.finish()


def test_a_lease_lost_before_the_job_starts_starts_nothing(
        tmp_path: Path, private_redis: RedisServer) -> None:
    client = redis.Redis.from_url(private_redis.url)
    client.set("lock", "someone-else", px=5000)
    marker = tmp_path / "ran"
    job = Job(f"touch {marker}", tmp_path,
              lease=Lease(_connect(private_redis.url), "lock", "tok", 5.0))
    result = job.result(10)
    job.finish()
    assert result.stopped is not None and result.stopped.reason.endswith("before the job started")
    assert result.exit_code is None and not marker.exists()


def _unbounded(url: str) -> Callable[[], redis.Redis]:
    """A client whose calls may block for ever: the guard must not depend on its timeouts."""
    return lambda: redis.Redis.from_url(url)


def test_fencing_holds_while_a_renewal_hangs(tmp_path: Path,
                                            private_redis: RedisServer) -> None:
    assert private_redis.proc is not None
    redis.Redis.from_url(private_redis.url).set("lock", "tok", px=4000)
    pidfile = tmp_path / "job.pid"
    lease = Lease(_unbounded(private_redis.url), "lock", "tok", ttl=4.0)
    job = Job(f"echo $$ > {pidfile}; trap '' TERM; while true; do sleep 0.1; done",
              tmp_path, grace=30, lease=lease)
    wait_for(pidfile.exists, 10, what="job start")
    # A silent partition: the server takes connections and commands but never answers.
    os.kill(private_redis.proc.pid, signal.SIGSTOP)
    try:
        stopped_at = time.monotonic()
        result = job.result(10)
        killed_after = time.monotonic() - stopped_at
        assert result.stopped is not None and result.stopped.kind == StopKind.LEASE_LOST
        assert not process_alive(int(pidfile.read_text()))
        assert killed_after < 4.0 - 0.5  # dead before the lease could lapse, with room
        print(f"renewal hanging: job dead {killed_after:.2f} s after Redis went silent "
              "(lease 4 s)")
    finally:
        os.kill(private_redis.proc.pid, signal.SIGCONT)
    job.finish()


def test_a_job_that_exits_while_renewals_hang_keeps_its_exit(
        tmp_path: Path, private_redis: RedisServer) -> None:
    assert private_redis.proc is not None
    redis.Redis.from_url(private_redis.url).set("lock", "tok", px=4000)
    go = tmp_path / "go"
    started = tmp_path / "started"
    lease = Lease(_unbounded(private_redis.url), "lock", "tok", ttl=4.0)
    job = Job(f"touch {started}; while [ ! -e {go} ]; do sleep 0.05; done; exit 0",
              tmp_path, lease=lease)
    wait_for(started.exists, 10, what="job start")
    os.kill(private_redis.proc.pid, signal.SIGSTOP)
    try:
        time.sleep(0.8)  # a renewal is stuck now
        go.touch()  # the job ends on its own, inside the lease
        result = job.result(10)
    finally:
        os.kill(private_redis.proc.pid, signal.SIGCONT)
    job.finish()
    assert result == GuardResult(0, None)


@pytest.mark.skipif(not ROOT, reason="switching to the job user needs root")
def test_job_runs_as_the_job_user_and_cannot_read_the_executors_files() -> None:
    user = parse_user("nobody", "test")
    assert user.uid != 0
    # pytest's own temp dirs are private to root: the job user could not even enter them.
    with tempfile.TemporaryDirectory() as name:
        workdir = Path(name)
        os.chmod(workdir, 0o755)
        secret = workdir / "redis.url"
        secret.write_text("redis://:hunter2@127.0.0.1/0")
        secret.chmod(0o600)
        job = _as_job_user(secret, workdir, user.uid, user.gid)
        result = job.result()
        job.read()
        job.finish()
    lines = job.output.decode(errors="replace").splitlines()
    assert result.exit_code == 0
    assert lines[0] == str(user.uid)
    assert "denied" in lines and "denied2" in lines
    assert b"hunter2" not in job.output


def _as_job_user(secret: Path, workdir: Path, uid: int, gid: int) -> Job:
    return Job(f"id -u; cat {secret} || echo denied; cat /proc/$PPID/environ || echo denied2",
               workdir, sandbox=Sandbox(uid=uid, gid=gid))


@pytest.mark.skipif(not (ROOT and can_isolate()), reason="mount namespaces need root")
def test_sandbox_hides_the_state_dir_but_the_checkout(tmp_path: Path) -> None:
    state = tmp_path / "state"
    own = state / "checkouts" / "shop"
    other = state / "checkouts" / "blog"
    for path in (own, other):
        path.mkdir(parents=True)
        (path / "file").write_text(path.name)
    (state / "redis.url").write_text("redis://:pw@host/0")
    root = tmp_path / "jobs"
    root.mkdir()
    seen = root / "shop"
    job = Job(f"cat file; echo; pwd; ls {state}; cat {other}/file 2>/dev/null || echo hidden",
              seen, sandbox=Sandbox(hide=(str(state),), root=str(root),
                                    binds=((str(own), str(seen)),)))
    result = job.result()
    job.read()
    job.finish()
    assert result.exit_code == 0
    lines = job.output.decode().splitlines()
    # Its own file, where the job sees it; an empty state dir; the other app hidden.
    assert lines == ["shop", str(seen), "hidden"]
    assert (other / "file").read_text() == "blog"  # the host's view is untouched
