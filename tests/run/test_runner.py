"""The job process: exit codes, timeouts that leave nothing alive, daemons that may stay."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from postdeploy.run.output import OutputCapture
from postdeploy.run.runner import JobOutcome, StopRequest, job_processes, run_process
from postdeploy.store.records import Status
from tests.support.core import process_alive, wait_for


def deadline(seconds: float) -> Callable[[], StopRequest | None]:
    """A stand-in for the job clock: asks the runner to stop after ``seconds``."""
    end = time.monotonic() + seconds
    return lambda: (StopRequest(Status.TIMED_OUT, f"timed out after {seconds:g} s")
                    if time.monotonic() >= end else None)


def run(command: str, tmp_path: Path, timeout: float = 30, grace: float = 2,
        run_id: str = "test-run") -> tuple[JobOutcome, bytes, float]:
    chunks: list[bytes] = []
    env = {**os.environ, "POST_DEPLOY_RUN_ID": run_id}
    started = time.monotonic()
    with run_process(command, tmp_path, env, grace, run_id, chunks.append,
                     lambda: None, deadline(timeout)) as outcome:
        pass
    return outcome, b"".join(chunks), time.monotonic() - started


def test_success_and_output(tmp_path: Path) -> None:
    outcome, out, _ = run("echo hello; echo oops >&2; pwd", tmp_path)
    assert outcome.status == Status.SUCCEEDED and outcome.exit_code == 0
    assert out.decode().splitlines() == ["hello", "oops", str(tmp_path)]


def test_exit_code_is_a_failure(tmp_path: Path) -> None:
    outcome, _, _ = run("exit 3", tmp_path)
    assert (outcome.status, outcome.exit_code) == (Status.FAILED, 3)
    assert outcome.reason == "exited with code 3"


def test_timeout_kills_the_whole_job(tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild.pid"
    command = f"bash -c 'sleep 1000 & echo $! > {pidfile}; wait' ; echo never"
    outcome, _, elapsed = run(command, tmp_path, timeout=2, grace=2, run_id="t-timeout")
    assert outcome.status == Status.TIMED_OUT
    assert elapsed < 2 + 2 + 3
    grandchild = int(pidfile.read_text())
    wait_for(lambda: not process_alive(grandchild), 5, what="grandchild to die")
    assert job_processes("t-timeout") == []


def test_timeout_escalates_to_sigkill_and_catches_escaped_processes(tmp_path: Path) -> None:
    # Ignores SIGTERM, and one process leaves the group with setsid.
    command = ("trap '' TERM; setsid bash -c \"trap '' TERM; sleep 1000\" & "
               "while true; do sleep 0.1; done")
    outcome, _, elapsed = run(command, tmp_path, timeout=1, grace=1, run_id="t-stubborn")
    assert outcome.status == Status.TIMED_OUT
    assert elapsed < 1 + 1 + 3
    wait_for(lambda: job_processes("t-stubborn") == [], 5, what="every job process gone")


def test_daemon_holding_stdout_does_not_block(tmp_path: Path) -> None:
    pidfile = tmp_path / "daemon.pid"
    command = f"(sleep 300; echo late) & echo $! > {pidfile}; echo started"
    outcome, out, elapsed = run(command, tmp_path, timeout=60, run_id="t-daemon")
    assert outcome.status == Status.SUCCEEDED
    assert elapsed < 5
    assert b"started" in out
    daemon = int(pidfile.read_text())
    try:
        assert process_alive(daemon)
    finally:
        os.kill(daemon, 9)


def test_binary_output_is_replaced_not_fatal(tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    stored: list[bytes] = []
    capture = OutputCapture("app@1234567", 1024, [], lambda tail, total: stored.append(tail))
    with caplog.at_level(logging.INFO, "postdeploy.job"):
        with run_process("printf 'ok\\n\\xff\\xfe\\x00bin\\n'", tmp_path,
                         {**os.environ, "POST_DEPLOY_RUN_ID": "x"}, 1, "x",
                         capture.feed, lambda: None, deadline(10)) as outcome:
            capture.close()
    assert outcome == JobOutcome(Status.SUCCEEDED, 0)
    # The stored tail keeps the bytes as printed; the log shows them replaced.
    assert stored[-1] == b"ok\n\xff\xfe\x00bin\n"
    assert [r.getMessage() for r in caplog.records if r.name == "postdeploy.job"] == [
        "[POST-DEPLOY] app@1234567 | ok",
        "[POST-DEPLOY] app@1234567 | \ufffd\ufffd\\x00bin"]  # NUL shown, not written


def test_output_tail_is_capped_and_secrets_masked() -> None:
    stored: list[tuple[bytes, int]] = []
    capture = OutputCapture("app@1234567", 100, ["hunter2"],
                            lambda tail, total: stored.append((tail, total)))
    for i in range(1000):
        capture.feed(f"line {i} password=hunter2\n".encode())
    capture.feed(b"x" * 200_000)  # a long line with no newline
    capture.close()
    tail, total = stored[-1]
    assert len(tail) == 100
    assert total > 200_000
    assert b"hunter2" not in b"".join(t for t, _ in stored)
