"""A job's processes on this host: starting the job, finding, signalling and reaping them.

A job may leave its process group (setsid, daemons), but it cannot shed the
environment it inherited: a marker variable finds every process it started.
The job guard (:mod:`postdeploy.run.guard`) does not need the marker: as the job's
child subreaper it finds them all among its own descendants. Zombies are left
out: they run nothing and vanish once reaped.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Callable, Iterator, Mapping

import psutil

PR_SET_NAME = 15  # prctl option: this process's name (comm)
PR_SET_CHILD_SUBREAPER = 36  # prctl option: orphaned descendants are re-parented to us


def processes_with_env(name: str, value: str) -> list[int]:
    """Live processes other than us whose environment holds ``name=value``."""
    found = []
    for proc in _others():
        try:
            if proc.environ().get(name) == value and _alive(proc):
                found.append(proc.pid)
        except (psutil.Error, OSError):
            continue  # gone meanwhile, or not ours to read
    return found


def spawn_job(command: str, cwd: str, env: Mapping[str, str], output_fd: int,
              enter_sandbox: Callable[[], None],
              clear_to_start: Callable[[], bool] = lambda: True) -> int | None:
    """Fork and exec ``bash -c command`` in a session of its own; the job's pid.

    The job reads /dev/null and writes ``output_fd`` (stdout and stderr). In the
    child, ``enter_sandbox`` (user, mounts) runs before the chdir, so ``cwd`` is a
    path as the job sees the file system. ``clear_to_start`` runs here while the
    child gets ready, which then waits just before its exec: the job starts only
    if it says True (else None, and the child exits having run nothing), so a
    check made then (the lease) costs the start no time of its own. Raises
    OSError when the job cannot start.
    """
    errors_r, errors_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(errors_r)
            os.close(go_w)
            os.setsid()
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(output_fd, 1)
            os.dup2(output_fd, 2)
            enter_sandbox()
            os.chdir(cwd)
            low, high = sorted((errors_w, go_r))
            os.closerange(3, low)
            os.closerange(low + 1, high)
            os.closerange(high + 1, max_fd())  # errors_w itself closes at exec
            if os.read(go_r, 1) != b"g":
                os._exit(0)  # not cleared to start: nothing ran
            os.close(go_r)
            os.execve("/bin/bash", ["bash", "-c", command], env)
        except BaseException as exc:  # noqa: B036 (tell the parent, never return)
            with contextlib.suppress(Exception):
                os.write(errors_w, str(exc).encode()[:1000])
        finally:
            os._exit(127)
    os.close(errors_w)
    os.close(go_r)
    try:
        cleared = clear_to_start()
        if cleared:
            with contextlib.suppress(BrokenPipeError):  # it failed already: errors say why
                os.write(go_w, b"g")
    finally:
        os.close(go_w)
    failure = b""
    while chunk := os.read(errors_r, 1000):  # EOF at exec (close-on-exec) or at exit
        failure += chunk
    os.close(errors_r)
    if failure or not cleared:
        reap_children(pid, block=True)
    if failure:
        raise OSError(f"cannot start the job: {failure.decode(errors='replace')}")
    return pid if cleared else None


def live_descendants() -> list[psutil.Process]:
    """Every live descendant of ours: in a subreaper, the job's orphans included."""
    try:
        found = psutil.Process().children(recursive=True)
    except psutil.Error:
        return []
    alive = []
    for proc in found:
        with contextlib.suppress(psutil.Error):
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
    return alive


def signal_descendants(sig: signal.Signals) -> int:
    """Signal every live descendant, then reap who exited; how many were signalled."""
    targets = live_descendants()
    for proc in targets:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(sig)
    reap_children(None)
    return len(targets)


def reap_children(job_pid: int | None, block: bool = False) -> int | None:
    """Collect exited children (orphans included); the job's wait status if it exited.

    With ``block``, wait until ``job_pid`` itself exits (or no child is left).
    """
    status_of_job = None
    while True:
        try:
            pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
        except ChildProcessError:
            return status_of_job
        if pid == 0:
            return status_of_job
        if pid == job_pid:
            status_of_job = status
            if block:
                return status


def exit_code(status: int | None) -> int | None:
    """The exit code in a wait status; negative: the signal that killed the process."""
    if status is None:
        return None
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def detach_fds(keep: set[int]) -> None:
    """In a forked child: close every fd the parent had open but ``keep``; 0-2 go to
    /dev/null (unless kept)."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        if fd not in keep:
            os.dup2(null, fd)
    for fd in open_fds():
        if fd > 2 and fd not in keep and fd != null:
            with contextlib.suppress(OSError):
                os.close(fd)
    if null not in keep and null > 2:
        os.close(null)


def open_fds() -> Iterator[int]:
    """This process's open fds (every possible one where /proc is not mounted)."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        names = [str(fd) for fd in range(max_fd())]
    for name in names:
        yield int(name)


def max_fd() -> int:
    """One more than the highest fd this process may open."""
    return int(os.sysconf("SC_OPEN_MAX"))


def prctl(option: int, value: int | bytes) -> None:
    """Linux prctl(2) with one argument (PR_SET_NAME, ...); elsewhere, or on failure, nothing."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)


def _others() -> list[psutil.Process]:
    me = os.getpid()
    return [p for p in psutil.process_iter() if p.pid != me]


def _alive(proc: psutil.Process) -> bool:
    return bool(proc.status() != psutil.STATUS_ZOMBIE)


_PR_SET_PDEATHSIG = 1  # prctl(2)


def die_with_parent() -> None:
    """In a child before exec (Linux): get SIGTERM if `up` itself is killed outright."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):
            pass
