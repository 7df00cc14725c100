"""Run one job: ``bash -c COMMAND`` under its guard, until it ends or must stop.

The job is started by its guard (:mod:`postdeploy.run.guard`), a process of its own
that reaps and stops every descendant, renews the run's lease and watches for a
cancel; this module reads the job's output and says when it must stop (the
deadline, a revoke; see :mod:`postdeploy.run.clock`). A job that exits leaving a
daemon holding its stdout returns promptly: the pipe is handed to a detached
``cat`` so the daemon can keep writing without blocking or SIGPIPE.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import fcntl
import functools
import logging
import os
import selectors
import signal
import subprocess
import termios
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from postdeploy.run.guard import GuardHandle, GuardResult, GuardSpec, Lease, start_guard
from postdeploy.run.processes import processes_with_env
from postdeploy.run.sandbox import Sandbox
from postdeploy.run.stop import StopKind
from postdeploy.store.records import Status

log = logging.getLogger(__name__)

READ_SIZE = 1024 * 1024
# The job's output pipe holds this much (Linux default: 64 KiB): a chatty job blocks,
# and we wake, once per MiB instead of once per 64 KiB.
PIPE_SIZE = 1024 * 1024
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
TICK = 0.2  # seconds between looks at the guard and stop requests when the job is quiet
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


@contextmanager
def run_process(command: str, cwd: Path, env: Mapping[str, str], grace: float, run_id: str,
                on_output: Callable[[bytes], None], on_tick: Callable[[], None],
                should_stop: Callable[[], StopRequest | None], lease: Lease | None = None,
                sandbox: Sandbox | None = None) -> Iterator[JobOutcome]:
    """Run ``command`` until it exits or ``should_stop`` (asked about every TICK) says why not.

    Yields the outcome; the guard keeps the run's ``lease`` until the block ends,
    so record the run inside it. ``on_output`` gets raw bytes.
    """
    del run_id  # processes are found through the guard, not through markers
    _keep_freed_reads()
    read_end, write_end = os.pipe()
    with contextlib.suppress(OSError):  # above /proc/sys/fs/pipe-max-size: keep the default
        fcntl.fcntl(read_end, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    spec = GuardSpec(command=command, cwd=str(cwd), env=dict(env), grace=grace, lease=lease,
                     sandbox=sandbox or Sandbox())
    try:
        guard = start_guard(spec, write_end, on_log=lambda line: log.warning("%s", line))
    finally:
        os.close(write_end)
    try:
        outcome = _supervise(guard, read_end, on_output, on_tick, should_stop)
        yield outcome
    finally:
        guard.finish()


@functools.cache
def _keep_freed_reads() -> None:
    """Let glibc reuse the memory of freed output reads instead of giving it back.

    Reads of 128 KiB and more are otherwise mapped fresh and unmapped when freed
    (or trimmed off the heap), so every page of a chatty job's output is faulted
    in anew: up to a third of the time of a bare read loop. The pool process keeps
    a few MiB more instead (below M_TRIM_THRESHOLD). Elsewhere (musl, macOS): nothing.
    """
    with contextlib.suppress(AttributeError, OSError):
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, 4 * READ_SIZE)
        libc.mallopt(_M_TRIM_THRESHOLD, 16 * READ_SIZE)


def _supervise(guard: GuardHandle, fd: int, on_output: Callable[[bytes], None],
               on_tick: Callable[[], None],
               should_stop: Callable[[], StopRequest | None]) -> JobOutcome:
    os.set_blocking(fd, False)
    selector = selectors.DefaultSelector()
    selector.register(fd, selectors.EVENT_READ)
    pipe_open = True
    asked: StopRequest | None = None
    try:
        while True:
            if pipe_open:
                pipe_open = _pump(selector, fd, on_output, TICK)
                result = guard.poll(0)
            else:
                result = guard.poll(TICK)
            on_tick()
            if result is not None:
                break
            if asked is None and (asked := should_stop()) is not None:
                guard.stop(asked.reason)
        if pipe_open:
            _drain_after_exit(selector, fd, on_output)
    finally:
        selector.close()
        os.close(fd)
    return _outcome(guard, result, asked)


def _outcome(guard: GuardHandle, result: GuardResult, asked: StopRequest | None) -> JobOutcome:
    code = result.exit_code
    if result.start_error:
        return JobOutcome(Status.ERROR, None, result.start_error)
    if asked is not None:
        return JobOutcome(asked.status, code, asked.reason)
    stop = result.stopped
    if stop is not None:
        if stop.kind == StopKind.CANCELLED:
            return JobOutcome(Status.CANCELLED, code, stop.reason)
        if stop.kind == StopKind.GUARD_DIED and guard.job_pid is not None:
            _kill_group(guard.job_pid)  # its guard is gone: nothing else would stop it
            return JobOutcome(Status.FAILED, code, "the job killed its guard; it was stopped")
        # The lease lapsed (Redis unreachable, another worker took it) or the executor
        # is stopping: the run did not finish here, and its deployment is run again.
        return JobOutcome(Status.LOST, code, f"stopped: {stop.reason}")
    if code == 0:
        return JobOutcome(Status.SUCCEEDED, 0)
    if code is not None and code < 0:
        return JobOutcome(Status.FAILED, code, f"killed by signal {signal.Signals(-code).name}")
    return JobOutcome(Status.FAILED, code, f"exited with code {code}")


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def kill_run_processes(run_id: str) -> int:
    """SIGKILL what is left on this host of a run whose worker died; how many there were.

    Belt and braces for the guard, which stops a job when its worker dies: this
    finds the job's processes that still carry its run id in their environment.
    """
    pids = job_processes(run_id)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass  # already gone
    return len(pids)


def _pump(selector: selectors.BaseSelector, fd: int, on_output: Callable[[bytes], None],
          wait: float) -> bool:
    """Read what is there (waiting up to ``wait``); False once the pipe hit EOF.

    Each read asks for exactly the bytes the pipe holds (FIONREAD): ``os.read``
    allocates what it is asked for, and a READ_SIZE buffer per read, mostly
    unused and shrunk afterwards, costs more than the copy from the pipe itself.
    """
    if not selector.select(wait):
        return True
    waiting = array.array("i", [0])
    while True:
        try:
            fcntl.ioctl(fd, termios.FIONREAD, waiting, True)
            data = os.read(fd, min(waiting[0], READ_SIZE) or READ_SIZE)
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
    """Give the pipe to a detached ``cat``, so daemons may keep writing to it.

    ``sh`` backgrounds ``cat`` and exits at once, so ``cat`` is re-parented to init
    and this worker has nothing left to wait for; ``cat`` ends when the last writer does.
    The pipe goes in as fd 3: a background command of a non-interactive shell gets
    /dev/null as its stdin, and a ``cat`` reading that would exit at once, leaving the
    daemon to die of SIGPIPE at its next write.
    """
    os.set_blocking(fd, True)
    subprocess.run(["sh", "-c", "exec 3<&0; cat <&3 >/dev/null 2>&1 3<&- &"], stdin=fd,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                   check=False)


def job_processes(run_id: str) -> list[int]:
    """Live processes whose environment carries this run's id."""
    return processes_with_env("POST_DEPLOY_RUN_ID", run_id)
