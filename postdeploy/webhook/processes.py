"""Several webhook server processes on one port, and the parent that keeps them running.

One event loop answers a burst of deliveries one after the other, so the last of
200 waits for the 199 before it. N processes sharing the port (each with its own
listening socket, SO_REUSEPORT: the kernel spreads the connections among them)
spread a burst over N cores; each has its own Redis and broker connections and
its own batches, and the delivery ids they share in Redis still catch a replay
whichever process gets it. Tornado's ``fork_processes`` forks them and starts
one that dies again on the same socket (the connections waiting on it are not
lost); past MAX_RESTARTS it gives up and the service stops with exit 1. SIGTERM
or SIGINT to the parent makes every server process answer the requests in hand
and exit; the parent exits 0 once they all have."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import Callable

import tornado.netutil
import tornado.process

from postdeploy.errors import ConfigError

log = logging.getLogger(__name__)

# Each process holds its own connections and memory; beyond a few, a burst
# gains nothing on a host that also runs the workers.
MAX_DEFAULT = 4
# Deaths over the service's whole life (fork_processes counts them all, not per
# minute): a process that dies at every start stops the service within seconds,
# while the odd death (an out-of-memory kill) takes a hundred to stop it.
MAX_RESTARTS = 100
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}

_stop_pipe: int | None = None  # in a forked server process: the parent's stop pipe


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


def run_servers(sockets: list[list[socket.socket]], serve: Serve) -> int:
    """``serve`` on each set of ``sockets`` (from :func:`listen_sockets`): in this process
    if there is one set, else each in a process of its own until SIGTERM/SIGINT; 0 then.

    ``serve`` must make its own connections and threads (none may exist in the
    parent at the fork), and wait on :func:`stop_event`.
    """
    if len(sockets) == 1:
        return serve(sockets[0])
    # fork_processes neither passes signals on nor ties its children to the parent.
    # A pipe does both: the server processes watch its read end, which reads as
    # closed once the parent has closed the write end on SIGTERM/SIGINT, or died
    # (even before a server process started watching, or while one is restarted).
    reader, writer = os.pipe()

    def close_writer(*_: object) -> None:
        nonlocal writer
        fd, writer = writer, -1
        if fd >= 0:
            os.close(fd)

    for sig in STOP_SIGNALS:
        signal.signal(sig, close_writer)
    try:
        index = tornado.process.fork_processes(len(sockets), MAX_RESTARTS)
    except SystemExit:  # its way of saying that every server process exited with 0
        return 0
    except RuntimeError:  # too many restarts: stop the ones still running, and wait
        log.error("webhook: server processes died %d times; stopping the service",
                  MAX_RESTARTS + 1)
        close_writer()
        while True:
            try:
                os.wait()
            except ChildProcessError:
                return 1
    for sig in STOP_SIGNALS:  # a server process: until stop_event's handlers
        signal.signal(sig, signal.SIG_IGN)
    close_writer()
    global _stop_pipe
    _stop_pipe = reader
    for other, held in enumerate(sockets):
        if other != index:  # each process accepts on its own socket only
            for sock in held:
                sock.close()
    return serve(sockets[index])


def stop_event() -> asyncio.Event:
    """An event of the running loop, set on SIGTERM or SIGINT, and in a server process
    of :func:`run_servers` once its parent stops or is gone."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    pipe = _stop_pipe
    if pipe is not None:
        def parent_done() -> None:
            loop.remove_reader(pipe)
            stop.set()
        loop.add_reader(pipe, parent_done)
    return stop
