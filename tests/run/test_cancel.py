"""Cancel: `postdeploy cancel` and Flower's revoke, with real workers, Redis, git and CLI."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import redis

from postdeploy.run.runner import job_processes
from postdeploy.store import keys
from postdeploy.store.records import RunRecord, Status
from postdeploy.store.state import StateStore
from tests.faults.harness import crash_host
from tests.support.clirun import cli, cli_env
from tests.support.core import (
    GitRemote,
    Service,
    appspec_yaml,
    finished_runs,
    output_of,
    process_alive,
    runs,
    wait_for,
)

Start = Callable[..., Service]
EnvFor = Callable[..., dict[str, str]]
# A job with a child process, so "its processes are gone" means more than one pid.
LONG_JOB = "echo started; sleep 300 & sleep 300; wait"


def cancel_cli(redis_url: str, where: Path, *args: str,
               **env: str) -> subprocess.CompletedProcess[str]:
    """The real CLI on its own state directory: it knows the workers only through Redis."""
    return cli(where, "cancel", *args, env=cli_env(POSTDEPLOY_REDIS_URL=redis_url, **env),
               timeout=60)


def queue_manual_run(env: dict[str, str], sha: str) -> str:
    """`postdeploy run shop --sha SHA` (as configured in ``env``); the run's id."""
    queued = subprocess.run([sys.executable, "-m", "postdeploy.cli", "run", "shop", "--sha", sha],
                            env=env, capture_output=True, text=True, timeout=60)
    assert queued.returncode == 0, queued.stderr
    return queued.stdout.split()[3]  # "queued manual run ID of shop@sha7"


def wait_running(client: redis.Redis, timeout: float = 30) -> RunRecord:
    """The app's run once its job has printed "started"."""
    def started() -> list[RunRecord]:
        return [r for r in runs(client, "shop") if r.status == "running"
                and "started" in output_of(client, r.id)]
    return wait_for(started, timeout, what="the job to start")[0]


def wait_checks(client: redis.Redis, count: int) -> None:
    """Wait until ``count`` more commit checks of the app have completed."""
    store = StateStore(client)
    for _ in range(count):
        before = store.checked_at("shop") or 0.0
        wait_for(lambda b=before: (store.checked_at("shop") or 0.0) > b, 20,  # type: ignore[misc]
                 what="a check")


def pool_pids(worker: Service) -> set[int]:
    return {p.pid for p in psutil.Process(worker.proc.pid).children()}


def worker_ready(worker: Service) -> bool:
    return " ready." in worker.log()


def expected_reason() -> str:
    return f"cancelled from the CLI by {_user()}@{socket.gethostname()}"


def _user() -> str:
    from postdeploy.run.cancel import _user as user
    return user()


def test_cancel_stops_a_running_job_and_its_commit_is_not_run_again(
        remote: GitRemote, rclient: redis.Redis, redis_url: str, services: Start,
        env_for: EnvFor, tmp_path: Path) -> None:
    sha = remote.commit({"appspec.yaml": appspec_yaml(LONG_JOB, timeout="600")})
    worker = services("worker", env_for(remote))
    services("beat", env_for(remote))
    running = wait_running(rclient)
    def all_started() -> list[int]:  # bash, the background sleep and the foreground one
        pids = job_processes(running.id)
        return pids if len(pids) >= 3 else []
    pids = wait_for(all_started, 10, what="the job's processes")
    pools = pool_pids(worker)

    started = time.monotonic()
    result = cancel_cli(redis_url, tmp_path / "elsewhere", "shop")
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    reason = expected_reason()
    assert result.stdout == f"cancelled run {running.id} of shop@{sha[:7]}: {reason}\n"
    # The CLI's own start-up is part of it; the stop itself is one tick away.
    assert elapsed < 2 + 3, elapsed
    done = finished_runs(rclient, "shop")
    assert [(r.id, r.status, r.reason) for r in done] == [(running.id, "cancelled", reason)]
    assert job_processes(running.id) == []
    assert not any(process_alive(p) for p in pids)
    assert "the job's processes were stopped" in output_of(rclient, running.id)
    assert pool_pids(worker) == pools and worker.alive()

    # The cancelled automatic run's commit is done: later checks queue nothing.
    wait_checks(rclient, 4)
    assert [r.id for r in runs(rclient, "shop")] == [running.id]
    nothing = cancel_cli(redis_url, tmp_path / "elsewhere", "shop")
    assert (nothing.returncode, nothing.stdout) == (
        1, "nothing to cancel: shop has no queued, waiting or running run\n")
    assert nothing.stderr == ""


def test_a_queued_run_is_cancelled_and_never_starts(
        remote: GitRemote, rclient: redis.Redis, redis_url: str, services: Start,
        env_for: EnvFor, state_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    sha = remote.commit({"appspec.yaml": appspec_yaml(f"touch {marker}")})
    env = env_for(remote)
    # No worker yet: the run waits in the queue.
    run_id = queue_manual_run(env, sha)
    [record] = runs(rclient, "shop")
    assert record.id == run_id
    assert record.status == "queued"

    # No worker has registered the app yet: this CLI is configured with it.
    result = cancel_cli(redis_url, tmp_path / "elsewhere", "shop", record.id,
                        POSTDEPLOY_REPO=remote.url, POSTDEPLOY_APP="shop")
    assert result.returncode == 0, result.stderr
    assert result.stdout == (f"cancelled run {record.id} of shop@{sha[:7]}: "
                             f"{expected_reason()}\n")

    worker = services("worker", env)  # now a worker takes the message, and refuses it
    wait_for(lambda: any(json.loads(rclient.get(k) or b"{}").get("status") == "FAILURE"
                         for k in rclient.keys(f"{keys.CELERY_PREFIX}celery-task-meta-*")),
             30, what="the task to end")
    [after] = runs(rclient, "shop")
    assert (after.id, after.status, after.started_at) == (record.id, "cancelled", None)
    assert not marker.exists()
    assert "POST_DEPLOY job started" not in worker.log()
    again = cancel_cli(redis_url, tmp_path / "elsewhere", "shop", record.id)
    assert (again.returncode, again.stdout) == (1, f"run {record.id} already ended as "
                                                   "cancelled\n")


def test_a_job_ignoring_sigterm_is_killed_after_the_grace(
        remote: GitRemote, rclient: redis.Redis, redis_url: str, services: Start,
        env_for: EnvFor, tmp_path: Path) -> None:
    remote.commit({"appspec.yaml": appspec_yaml(
        "trap '' TERM; echo started; sleep 300 & sleep 300; wait", timeout="600")})
    services("worker", env_for(remote))  # POSTDEPLOY_KILL_GRACE=2
    services("beat", env_for(remote))
    running = wait_running(rclient)

    started = time.monotonic()
    result = cancel_cli(redis_url, tmp_path / "elsewhere", "shop")
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"cancelled run {running.id} ")
    assert "stopping run" in result.stderr
    assert 2 <= elapsed < 2 + 5, elapsed  # SIGTERM, the 2 s grace, SIGKILL
    [done] = finished_runs(rclient, "shop")
    assert (done.status, done.reason) == ("cancelled", expected_reason())
    assert job_processes(running.id) == []


def test_cancel_reaches_a_run_on_another_host(
        remote: GitRemote, rclient: redis.Redis, redis_url: str, services: Start,
        env_for: EnvFor, tmp_path: Path) -> None:
    """The worker has its own state directory and node name; the CLI knows only Redis."""
    remote.commit({"appspec.yaml": appspec_yaml(LONG_JOB, timeout="600")})
    other = {**env_for(remote), "POSTDEPLOY_STATE_DIR": str(tmp_path / "other-host")}
    worker = services("worker", other, "other-host")
    services("beat", other)
    running = wait_running(rclient)
    pools = pool_pids(worker)

    result = cancel_cli(redis_url, tmp_path / "operator", "shop", running.id)
    assert result.returncode == 0, result.stderr
    [done] = finished_runs(rclient, "shop")
    assert (done.id, done.status, done.reason) == (running.id, "cancelled", expected_reason())
    assert job_processes(running.id) == []
    assert pool_pids(worker) == pools and worker.alive()


def test_a_cancel_of_a_run_whose_worker_died_stands_and_its_commit_is_not_run_again(
        remote: GitRemote, rclient: redis.Redis, redis_url: str, services: Start,
        env_for: EnvFor, tmp_path: Path) -> None:
    remote.commit({"appspec.yaml": appspec_yaml(LONG_JOB, timeout="600")})
    env = env_for(remote)
    worker = services("worker", env)
    services("beat", env)
    running = wait_running(rclient)
    crash_host(worker, [running.id])

    result = cancel_cli(redis_url, tmp_path / "elsewhere", "shop")
    assert result.returncode == 0, result.stderr
    assert result.stdout == (f"run {running.id} of shop@{running.sha[:7]} is still stopping "
                             "after 7 s; the cancel request stands (see `postdeploy history "
                             "shop`)\n")
    assert "still stopping after" in result.stderr

    # The next worker finds the run lost: the operator's cancel is what it records.
    services("worker", env, "worker-after")
    [done] = wait_for(lambda: [r for r in runs(rclient, "shop") if r.id == running.id
                               and r.status != "running"], 40, what="the run to be ended")
    assert done.status == "cancelled"
    assert done.reason == f"{expected_reason()} (its worker had stopped mid-run)"
    wait_checks(rclient, 3)
    assert [r.status for r in runs(rclient, "shop")
            if r.status not in ("superseded", "cancelled")] == []


def test_a_cancel_racing_the_jobs_own_end_tells_what_happened(
        remote: GitRemote, rclient: redis.Redis, redis_url: str, services: Start,
        env_for: EnvFor, tmp_path: Path) -> None:
    """The lifecycle decides: the CLI reports what the record says, never both."""
    remote.commit({"appspec.yaml": appspec_yaml("echo started; sleep 1", timeout="60")})
    env = env_for(remote)
    services("worker", env)
    seen: set[int] = set()
    for delay in (0.3, 0.6, 0.9, 1.2):
        started = time.monotonic()
        run_id = queue_manual_run(env, remote.head())
        wait_for(lambda r=run_id: "started" in output_of(rclient, r), 30,  # type: ignore[misc]
                 what="the job to start")
        time.sleep(max(0.0, delay - (time.monotonic() - started)))  # aim near the job's end
        result = cancel_cli(redis_url, tmp_path / "elsewhere", "shop", run_id)
        record = StateStore(rclient).get_run(run_id)
        assert record is not None and record.status.finished
        if result.returncode == 0:
            assert record.status == "cancelled"
            assert result.stdout.startswith(f"cancelled run {run_id} ")
        else:
            assert result.returncode == 1, result.stderr
            assert result.stdout == f"run {run_id} already ended as {record.status}\n"
            assert record.status == "succeeded"
        seen.add(result.returncode)
        assert job_processes(run_id) == []
    # Every run was recorded once: one finish counted per run.
    counted = {str(k): int(v) for k, v in rclient.hgetall(keys.RUNS_TOTAL).items()}
    assert sum(counted.values()) == 4, counted
    ended = cancel_cli(redis_url, tmp_path / "elsewhere", "shop", run_id)
    assert ended.returncode == 1 and "already ended as" in ended.stdout


def test_bad_input_exits_2_with_one_line(
        remote: GitRemote, rclient: redis.Redis, redis_url: str, services: Start,
        env_for: EnvFor, tmp_path: Path) -> None:
    remote.commit({"appspec.yaml": appspec_yaml("true")})
    worker = services("worker", env_for(remote))
    wait_for(lambda: worker_ready(worker), 30, what="the worker")
    wait_for(lambda: StateStore(rclient).registered_apps(), 30, what="the app's registration")
    blog = RunRecord.new("blog", "a" * 40, "manual")
    StateStore(rclient).add_run(blog)
    where = tmp_path / "elsewhere"
    for args, expected in (
            (("nosuch",), "postdeploy: error: unknown app 'nosuch' (known apps: shop)"),
            (("shop", "nosuchrun"), "postdeploy: error: no run 'nosuchrun' of 'shop'"),
            (("shop", blog.id), f"postdeploy: error: no run '{blog.id}' of 'shop'")):
        result = cancel_cli(redis_url, where, *args)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.startswith(expected) and result.stderr.count("\n") == 1
        assert "Traceback" not in result.stderr and result.stdout == ""
    assert StateStore(rclient).get_run(blog.id).status == Status.QUEUED  # type: ignore[union-attr]
    assert worker.alive()


_REVOKE = """
import sys
from postdeploy.store import celery_app
from postdeploy.config.settings import Settings
url, task_id, terminate = sys.argv[1], sys.argv[2], sys.argv[3] == "terminate"
app = celery_app.configure(Settings(), url)
app.control.revoke(task_id, terminate=terminate)
"""


def revoke(redis_url: str, task_id: str, terminate: bool) -> None:
    """Flower's revoke, from a process of its own (Flower's API calls the same)."""
    subprocess.run([sys.executable, "-c", _REVOKE, redis_url, task_id,
                    "terminate" if terminate else "no"], check=True, timeout=60,
                   capture_output=True)


@pytest.mark.parametrize("terminate", [False, True], ids=["revoke", "revoke-terminate"])
def test_flower_revoke_of_a_running_job_cancels_it_and_the_pool_lives(
        terminate: bool, remote: GitRemote, rclient: redis.Redis, redis_url: str,
        services: Start, env_for: EnvFor) -> None:
    remote.commit({"appspec.yaml": appspec_yaml(LONG_JOB, timeout="600")})
    worker = services("worker", env_for(remote))
    services("beat", env_for(remote))
    running = wait_running(rclient)
    assert running.task_id
    pools = pool_pids(worker)

    revoke(redis_url, running.task_id, terminate)
    [done] = wait_for(lambda: finished_runs(rclient, "shop"), 10, what="the run to end")
    assert (done.id, done.status) == (running.id, "cancelled")
    if terminate:
        assert "terminated with SIGTERM" in (done.reason or "")
    else:
        assert done.reason == "cancelled by a revoke from Flower (or celery control) while it ran"
    wait_for(lambda: job_processes(running.id) == [], 10, what="the job's processes to stop")
    assert pool_pids(worker) == pools and worker.alive()
    # Never a second copy: not a lock TTL later either (the commit is done).
    wait_checks(rclient, 6)
    assert [r.id for r in runs(rclient, "shop")] == [running.id]
    assert pool_pids(worker) == pools


class HoldingProxy:
    """A TCP proxy in front of Redis that holds a client's command matching ``hold_if``
    (a whole chunk as sent) until :meth:`release`: a cancel that reads, then writes late."""

    def __init__(self, port: int, hold_if: Callable[[bytes], bool]) -> None:
        self.upstream = port
        self.hold_if = hold_if
        self.holding = threading.Event()
        self.released = threading.Event()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def release(self) -> None:
        self.released.set()

    def close(self) -> None:
        self.released.set()
        self.server.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream), timeout=10)
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False),
                             daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        source.settimeout(120)
        with contextlib.suppress(OSError):
            while chunk := source.recv(65536):
                if from_client and not self.released.is_set() and self.hold_if(chunk):
                    self.holding.set()
                    self.released.wait(60)
                sink.sendall(chunk)
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)


def test_a_cancel_that_read_queued_and_writes_once_the_job_started_stops_it(
        remote: GitRemote, rclient: redis.Redis, redis_url: str, services: Start,
        env_for: EnvFor, tmp_path: Path) -> None:
    started, ended = tmp_path / "started", tmp_path / "ended"
    sha = remote.commit({"appspec.yaml": appspec_yaml(
        f"touch {started}; sleep 5; touch {ended}", timeout="600")})
    env = env_for(remote)
    run_id = queue_manual_run(env, sha)
    # The app's lock is busy: the worker takes the message and retries, the run stays queued.
    rclient.set(keys.run_lock("shop"), "held by the test", ex=300)
    worker = services("worker", env)
    wait_for(lambda: worker_ready(worker), 30, what="the worker")
    # The cancel's write of the run (a Lua call) is held back after it read `queued`.
    proxy = HoldingProxy(redis.Redis.from_url(redis_url).connection_pool.connection_kwargs[
        "port"], lambda chunk: b"EVAL" in chunk.upper())
    try:
        cancel = subprocess.Popen(
            [sys.executable, "-m", "postdeploy.cli", "--state-dir", str(tmp_path / "elsewhere"),
             "cancel", "shop", run_id],
            env=cli_env(POSTDEPLOY_REDIS_URL=f"redis://127.0.0.1:{proxy.port}/0"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proxy.holding.wait(30), "the cancel never wrote the run"
        rclient.delete(keys.run_lock("shop"))  # the worker starts the run now
        wait_for(lambda: StateStore(rclient).get_run(run_id).status != "queued",  # type: ignore[union-attr]
                 30, what="the worker to start the run")
        proxy.release()
        out, err = cancel.communicate(timeout=60)
    finally:
        proxy.close()
    assert cancel.returncode == 0, (out, err)
    assert out.startswith(f"cancelled run {run_id} ")
    record = StateStore(rclient).get_run(run_id)
    assert record is not None and record.status == "cancelled"
    # Every process of the job is gone: nothing is left that could still end it.
    wait_for(lambda: job_processes(run_id) == [], 30, what="the job's processes to go")
    assert not ended.exists()
