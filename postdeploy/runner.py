"""Run one job process: ``bash -c COMMAND`` in its own process group, until it ends or must stop.

The runner keeps no clock of its own: its caller says when the job must stop
(the deadline, a revoke; see :mod:`postdeploy.jobclock`). Then the whole group
gets SIGTERM, then SIGKILL after a grace period;
processes that left the group but carry the run's id in their environment are
stopped too, so nothing of a timed-out job survives. A job that exits leaving a
daemon holding its stdout returns promptly: the pipe is handed to a detached
``cat >/dev/null`` so the daemon can keep writing without blocking or SIGPIPE.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from postdeploy.processes import live_in_group, processes_with_env
from postdeploy.records import Status

log = logging.getLogger(__name__)

READ_SIZE = 256 * 1024
TICK = 0.2  # seconds between deadline checks when the job is quiet
DRAIN_QUIET = 0.2  # after the job exits: this long without output means a daemon holds the pipe
DRAIN_MAX = 2.0  # ...and never wait longer than this for the last output


@dataclass(frozen=True)
class JobOutcome:
    status: Status
    exit_code: int | None
    reason: str | None = None


@dataclass(frozen=True)
class StopRequest:
    """Why a running job must stop now, and the status its run then ends with."""

    status: Status
    reason: str


def run_process(command: str, cwd: Path, env: Mapping[str, str], grace: float, run_id: str,
                on_output: Callable[[bytes], None], on_tick: Callable[[], None],
                should_stop: Callable[[], StopRequest | None]) -> JobOutcome:
    """Run ``command`` until it exits or ``should_stop`` (asked about every TICK) says why not.

    ``on_output`` gets raw bytes. ``env`` must contain POST_DEPLOY_RUN_ID=run_id:
    it is how stray processes are found.
    """
    proc = subprocess.Popen(
        ["bash", "-c", command], cwd=cwd, env=dict(env), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, bufsize=0)
    guard = _JobGuard(proc.pid)
    try:
        return _supervise(proc, grace, run_id, on_output, on_tick, should_stop)
    finally:
        guard.dismiss()


def _supervise(proc: subprocess.Popen[bytes], grace: float, run_id: str,
               on_output: Callable[[bytes], None], on_tick: Callable[[], None],
               should_stop: Callable[[], StopRequest | None]) -> JobOutcome:
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    selector = selectors.DefaultSelector()
    selector.register(fd, selectors.EVENT_READ)
    pipe_open = True
    try:
        while True:
            if pipe_open:
                pipe_open = _pump(selector, fd, on_output, TICK)
            else:
                _wait_exit(proc, TICK)
            on_tick()
            if proc.poll() is not None:
                break
            if (stop := should_stop()) is not None:
                _stop_group(proc, run_id, grace, selector, fd if pipe_open else None, on_output)
                return JobOutcome(stop.status, proc.returncode, stop.reason)
        if pipe_open:
            _drain_after_exit(selector, fd, on_output)
    finally:
        selector.close()
        proc.stdout.close()
    code = proc.returncode
    if code == 0:
        return JobOutcome(Status.SUCCEEDED, 0)
    if code < 0:
        return JobOutcome(Status.FAILED, code, f"killed by signal {signal.Signals(-code).name}")
    return JobOutcome(Status.FAILED, code, f"exited with code {code}")


def _wait_exit(proc: subprocess.Popen[bytes], wait: float) -> None:
    try:
        proc.wait(wait)
    except subprocess.TimeoutExpired:
        pass


class _JobGuard:
    """Kills the job's process group if this worker process dies while the job runs.

    The job sits in its own session, so a pool process killed by the OOM killer or
    Celery's hard time limit would leave it running on: the commit is then run
    again, and two copies would overlap. The guard is a tiny ``sh`` in its own session
    reading a pipe that only this process holds open; if we die, the read ends and
    it SIGKILLs the group. When the job ends normally the guard is killed first, so
    daemons the job left behind (the guide's ``pm2 start``) are not touched.
    """

    def __init__(self, pgid: int) -> None:
        read_end, self._write_end = os.pipe()
        try:
            self._proc: subprocess.Popen[bytes] | None = subprocess.Popen(
                ["sh", "-c", 'read _; kill -9 -"$1" 2>/dev/null', "job-guard", str(pgid)],
                stdin=read_end, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True)
        except OSError as exc:  # no guard is no reason not to run the job
            log.warning("cannot start the job guard: %s", exc)
            self._proc = None
        finally:
            os.close(read_end)

    def dismiss(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
        os.close(self._write_end)


def kill_run_processes(run_id: str) -> int:
    """SIGKILL what is left on this host of a run whose worker died; how many there were."""
    pids = job_processes(run_id)
    _signal_pids(pids, signal.SIGKILL)
    return len(pids)


def _pump(selector: selectors.BaseSelector, fd: int, on_output: Callable[[bytes], None],
          wait: float) -> bool:
    """Read what is there (waiting up to ``wait``); False once the pipe hit EOF."""
    if not selector.select(wait):
        return True
    while True:
        try:
            data = os.read(fd, READ_SIZE)
        except BlockingIOError:
            return True
        if not data:
            return False
        on_output(data)


def _drain_after_exit(selector: selectors.BaseSelector, fd: int,
                      on_output: Callable[[bytes], None]) -> None:
    """Collect the last output; if something still holds the pipe, detach from it."""
    deadline = time.monotonic() + DRAIN_MAX
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        if not selector.select(DRAIN_QUIET / 4):
            if time.monotonic() - quiet_since >= DRAIN_QUIET:
                break
            continue
        quiet_since = time.monotonic()
        if not _pump(selector, fd, on_output, 0):
            return
    _hand_to_sink(fd)


def _hand_to_sink(fd: int) -> None:
    """Give the pipe to a detached ``cat >/dev/null``, so daemons may keep writing to it.

    ``sh`` backgrounds ``cat`` and exits at once, so ``cat`` is re-parented to init
    and this worker has nothing left to wait for; ``cat`` ends when the last writer does.
    """
    os.set_blocking(fd, True)
    subprocess.run(["sh", "-c", "cat >/dev/null 2>&1 &"], stdin=fd, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, start_new_session=True, check=False)


def _stop_group(proc: subprocess.Popen[bytes], run_id: str, grace: float,
                selector: selectors.BaseSelector, fd: int | None,
                on_output: Callable[[bytes], None]) -> None:
    """SIGTERM the job's processes, keep reading for ``grace`` seconds, then SIGKILL."""
    _signal_job(proc.pid, run_id, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if fd is not None and not _pump(selector, fd, on_output, 0.1):
            fd = None
        elif fd is None:
            time.sleep(0.1)
        proc.poll()
        if not _job_alive(proc.pid, run_id):
            break
    _signal_job(proc.pid, run_id, signal.SIGKILL)
    proc.wait()
    if fd is not None:
        _hand_to_sink(fd)


def _signal_job(pgid: int, run_id: str, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    _signal_pids(job_processes(run_id), sig)


def _signal_pids(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass  # already gone


def _job_alive(pgid: int, run_id: str) -> bool:
    try:
        os.killpg(pgid, 0)
        group_alive = any(live_in_group(pgid))
    except ProcessLookupError:
        group_alive = False
    return group_alive or bool(job_processes(run_id))


def job_processes(run_id: str) -> list[int]:
    """Live processes whose environment carries this run's id."""
    return processes_with_env("POST_DEPLOY_RUN_ID", run_id)
