"""`postdeploy webhook --processes N`: several real server processes on one port,
watched by their parent; real HTTP, real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import redis

from tests.conftest import EXTERNAL_REDIS
from tests.support.clirun import all_dead, cli_env, family
from tests.support.core import REPO_ROOT, RedisServer, Service, free_port, wait_for
from tests.support.webhook_client import (
    cli_run,
    github_push,
    healthy,
    post,
    post_concurrently,
    queued_checks,
    raw_request,
    server_pids,
    signed,
    start_hook,
)

SECRET = "procs-webhook-secret-91d3"


@pytest.fixture
def env(redis_server: RedisServer, tmp_path: Path) -> dict[str, str]:
    return cli_env(POSTDEPLOY_REDIS_URL=EXTERNAL_REDIS or redis_server.url,
                   POSTDEPLOY_REPO="https://github.com/acme/shop", POSTDEPLOY_APP="shop",
                   POSTDEPLOY_STATE_DIR=str(tmp_path / "state"),
                   POSTDEPLOY_WEBHOOK_SECRET=SECRET)


@pytest.fixture
def hook(env: dict[str, str], tmp_path: Path) -> Iterator[tuple[Service, int]]:
    port = free_port()
    service = start_hook(env, tmp_path / "webhook.log", port, processes=3)
    yield service, port
    service.stop(signal.SIGTERM)


def cpu(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def push(port: int, delivery: str | None = None) -> tuple[int, dict[str, object]]:
    body, headers = signed("github", SECRET, github_push("acme/shop"), delivery=delivery)
    reply = post(port, "/hooks/github", body, headers)
    return reply.status, reply.body


def test_a_burst_is_shared_by_the_processes_and_queues_few_checks(
        hook: tuple[Service, int], rclient: redis.Redis) -> None:
    service, port = hook
    pids = server_pids(service)
    assert len(pids) == 3 and service.proc.pid not in pids
    before = {pid: cpu(pid) for pid in pids}
    requests = []
    for _ in range(200):
        body, headers = signed("github", SECRET, github_push("acme/shop"))
        requests.append(raw_request("/hooks/github", body, headers))
    answers = post_concurrently(port, requests)
    assert [status for status, _ in answers] == [202] * 200
    # Every process answered some: the kernel spread the connections over their sockets.
    assert all(cpu(pid) - before[pid] > 0.005 for pid in pids), before
    checks = queued_checks(rclient)
    assert set(checks) == {"shop"} and len(checks) < 50  # batched within each process


def test_a_replay_is_caught_whichever_process_gets_it(hook: tuple[Service, int],
                                                      rclient: redis.Redis) -> None:
    _, port = hook
    delivery = str(uuid.uuid4())
    body, headers = signed("github", SECRET, github_push("acme/shop"), delivery=delivery)
    # Many connections, so that the copies land on every process.
    answers = post_concurrently(port, [raw_request("/hooks/github", body, headers)] * 30)
    assert sorted(status for status, _ in answers) == [200] * 29 + [202]
    for _ in range(10):  # one connection at a time, each hashed anew
        assert push(port, delivery)[0] == 200
    assert queued_checks(rclient) == ["shop"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_parent_stops_every_process(env: dict[str, str], tmp_path: Path,
                                                    sig: int) -> None:
    port = free_port()
    service = start_hook(env, tmp_path / "webhook.log", port, processes=2)
    pids = family(service.proc.pid)
    assert len(pids) == 3
    service.proc.send_signal(sig)
    assert service.proc.wait(15) == 0, service.log()[-2000:]
    wait_for(lambda: all_dead(pids), 10, what="every server process to exit")
    assert not healthy(port)
    assert "Traceback" not in service.log() and "ERROR" not in service.log()
    service.stop()


def test_ctrl_c_reaches_the_whole_group_and_all_exit_cleanly(env: dict[str, str],
                                                              tmp_path: Path) -> None:
    port = free_port()
    service = start_hook(env, tmp_path / "webhook.log", port, processes=2)
    pids = family(service.proc.pid)
    os.killpg(service.proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    assert service.proc.wait(15) == 0, service.log()[-2000:]
    wait_for(lambda: all_dead(pids), 10, what="every server process to exit")
    assert "Traceback" not in service.log()
    service.stop()


def test_a_process_that_dies_is_reported_and_started_again(
        hook: tuple[Service, int], rclient: redis.Redis) -> None:
    service, port = hook
    victim, *others = server_pids(service)
    time.sleep(1.2)  # past the crash-loop guard: this is a death, not a failed start
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(server_pids(service)) == 3 and victim not in server_pids(service),
             15, what="the server process to be started again")
    assert service.alive() and set(others) <= set(server_pids(service))
    log = service.log()
    assert f"(pid {victim}) killed by signal 9, restarting" in log  # fork_processes' words
    for _ in range(20):  # every socket is served again
        assert push(port)[0] == 202


def test_a_parent_killed_outright_takes_its_processes_with_it(env: dict[str, str],
                                                               tmp_path: Path) -> None:
    port = free_port()
    service = start_hook(env, tmp_path / "webhook.log", port, processes=2)
    children = server_pids(service)
    service.proc.kill()
    service.proc.wait(10)
    wait_for(lambda: all_dead(children), 15, what="the orphaned server processes to exit")
    service.stop()


# Server process 0 fails at every start, as on a bad setting only it sees; 1 serves.
CRASH_LOOP = textwrap.dedent("""
    import asyncio, os, sys, tornado.process
    from postdeploy.config.logs import configure_logging
    from postdeploy.webhook.processes import listen_sockets, run_servers, stop_event

    async def wait() -> int:
        await stop_event().wait()
        return 0

    def serve(sockets):
        if tornado.process.task_id() == 0:
            return 1
        print("serving", os.getpid(), flush=True)
        return asyncio.run(wait())

    configure_logging("INFO")
    sys.exit(run_servers(listen_sockets("127.0.0.1", int(sys.argv[1]), 2), serve))
""")


def test_a_crash_loop_stops_the_service_with_one_error_and_exit_1() -> None:
    result = subprocess.run([sys.executable, "-c", CRASH_LOOP, str(free_port())],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result
    (error,) = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert "server processes died" in error and "stopping the service" in error, error
    # The process that did start was stopped, and waited for, before the service exited.
    serving = [int(line.split()[1]) for line in result.stdout.splitlines()]
    assert serving and all_dead(serving), result


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5", ""])
def test_a_bad_process_count_is_one_line_and_exit_2(env: dict[str, str], value: str) -> None:
    for command in (["-m", "postdeploy.cli", "webhook"], ["-m", "postdeploy.cli", "webhook"]):
        result = cli_run(command + ["--port", str(free_port()), "--processes", value], env)
        assert result.returncode == 2, result
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith("postdeploy: error: ") and "--processes" in line, line
