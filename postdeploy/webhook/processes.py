"""Several webhook server processes on one port, and the parent that keeps them running.

One event loop answers a burst of deliveries one after the other, so the last of
200 waits for the 199 before it. N processes sharing the port (each with its own
listening socket, SO_REUSEPORT: the kernel spreads the connections among them)
spread a burst over N cores; each has its own Redis and broker connections and
its own batches, and the delivery ids they share in Redis still catch a replay
whichever process gets it. The parent only forks and watches: a server process
that dies is logged and started again on the same socket (the connections
waiting on it are not lost), one that dies right after it started stops the
service (a crash loop helps nobody), and SIGTERM or SIGINT is passed on to
every server process, which answers the requests in hand and exits; what is
still running after ``stop_timeout`` is killed."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from types import FrameType

import tornado.netutil

from postdeploy.errors import ConfigError
from postdeploy.run.processes import die_with_parent

log = logging.getLogger(__name__)

# Each process holds its own connections and memory; beyond a few, a burst
# gains nothing on a host that also runs the workers.
MAX_DEFAULT = 4
CRASH_LOOP = 1.0  # seconds: a process that dies sooner after its start is not restarted
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def default_count() -> int:
    """One server process per CPU this process may use, at most MAX_DEFAULT."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_DEFAULT))


def listen_sockets(address: str, port: int, count: int) -> list[list[socket.socket]]:
    """The listening sockets of each of ``count`` server processes.

    Several processes each get their own sockets on the port (SO_REUSEPORT, so
    the kernel spreads connections among them); a plain bind first makes sure
    the port is free, so that another service on it is refused, not joined.
    """
    try:
        first = tornado.netutil.bind_sockets(port, address)
        if count == 1:
            return [first]
        for sock in first:
            sock.close()
        return [tornado.netutil.bind_sockets(port, address, reuse_port=True)
                for _ in range(count)]
    except OSError as exc:
        raise ConfigError(f"cannot listen on {address}:{port}: {exc.strerror or exc}; "
                          "pick another --port or --address") from None


Serve = Callable[[list[socket.socket]], int]  # one server process on its sockets -> exit code


def run_servers(sockets: list[list[socket.socket]], serve: Serve, stop_timeout: float) -> int:
    """``serve`` on each set of ``sockets`` (from :func:`listen_sockets`): in this process
    if there is one set, else each in a process of its own until SIGTERM/SIGINT; 0 then.

    ``serve`` must make its own connections and threads: none may exist in the
    parent at the fork.
    """
    if len(sockets) == 1:
        return serve(sockets[0])

    def serve_one(index: int) -> int:
        for other, held in enumerate(sockets):
            if other != index:  # each process accepts on its own socket only
                for sock in held:
                    sock.close()
        return serve(sockets[index])

    return _run_forked(len(sockets), serve_one, stop_timeout)


def _run_forked(count: int, serve: Callable[[int], int], stop_timeout: float) -> int:
    children: dict[int, tuple[int, float]] = {}  # pid -> (index, started)
    stopping = False
    failed = False

    parent = os.getpid()

    def start(index: int) -> None:
        # Signals wait until the child has its own handlers and the parent knows its pid.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:
                _child(serve, index, parent)  # never returns
            children[pid] = (index, time.monotonic())
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            signal.setitimer(signal.ITIMER_REAL, stop_timeout)
        _signal_all(children, signal.SIGTERM)

    def kill(signum: int, frame: FrameType | None) -> None:
        nonlocal failed
        if children:
            log.error("webhook: %d server process(es) still running after %.0f s; killed",
                      len(children), stop_timeout)
            failed = True
        _signal_all(children, signal.SIGKILL)

    for sig in STOP_SIGNALS:
        signal.signal(sig, stop)
    signal.signal(signal.SIGALRM, kill)
    for index in range(count):
        start(index)
    while children:
        pid, status = os.wait()  # retried after a signal handler ran (PEP 475)
        if pid not in children:
            continue
        index, started = children.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        if stopping:  # ended by the signal passed on if its own handlers were gone
            failed = failed or code not in (0, -signal.SIGTERM, -signal.SIGINT)
            continue
        if time.monotonic() - started < CRASH_LOOP:
            log.error("webhook: server process %d exited (%s) right after it started; "
                      "stopping the service", index, _how(code))
            failed = True
            stop(signal.SIGTERM, None)
            continue
        log.error("webhook: server process %d (pid %d) exited (%s); starting it again",
                  index, pid, _how(code))
        start(index)
    signal.setitimer(signal.ITIMER_REAL, 0)
    return 1 if failed else 0


def _child(serve: Callable[[int], int], index: int, parent: int) -> None:
    code = 1
    try:
        die_with_parent()  # a parent killed outright takes its server processes with it
        if os.getppid() != parent:  # ...even when it was killed before that took effect
            os._exit(1)
        for sig in STOP_SIGNALS | {signal.SIGALRM}:
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        code = serve(index)
    except KeyboardInterrupt:
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        log.exception("webhook: server process %d failed", index)
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # not the parent's exit path: its atexit handlers are the parent's


def _signal_all(children: dict[int, tuple[int, float]], sig: int) -> None:
    for pid in children:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:  # exited, not yet reaped
            pass


def _how(code: int) -> str:
    return f"signal {-code}" if code < 0 else f"code {code}"
