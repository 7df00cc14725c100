"""A call with a total deadline: run in a forked child, killed when its time is up.

Libraries that talk to the outside world (Apprise, through requests) bound each
socket read, not the whole call, so a server that sends a byte every few
seconds holds the caller for as long as it likes. A thread cannot be stopped;
a child process can: the caller gets the answer, or a kill at the deadline, and
nothing of the call is left running. Forking costs about a millisecond and
needs no re-import, which a fresh interpreter would.
"""

from __future__ import annotations

import json
import os
import select
import signal
import time
from collections.abc import Callable
from contextlib import suppress
from typing import Any

MAX_ANSWER = 1024 * 1024  # bytes of the child's JSON answer that are read


class DeadlinePassed(Exception):
    """The call did not return within its deadline; its process was killed."""


def call_forked(call: Callable[[], Any], within: float) -> Any:
    """``call()`` in a child process; its (JSON-able) result, or DeadlinePassed.

    An exception in the child comes back as RuntimeError with its type and text.
    """
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no cleanup of the parent's (atexit, buffers) may run here
        code = 1
        try:
            os.close(reader)
            try:
                answer: dict[str, Any] = {"result": call()}
            except BaseException as exc:  # noqa: BLE001 (reported to the parent)
                answer = {"error": f"{type(exc).__name__}: {exc}"}
            _write_all(writer, json.dumps(answer).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(writer)
    try:
        data = _read_all(reader, time.monotonic() + within)
    finally:
        os.close(reader)
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # done, or its time is up: either way, gone
        os.waitpid(pid, 0)
    if data is None:
        raise DeadlinePassed(f"no result within {within:g} s")
    try:
        answer = json.loads(data)
    except ValueError:
        raise RuntimeError("the call's process ended without a result") from None
    if "error" in answer:
        raise RuntimeError(answer["error"])
    return answer["result"]


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data[:MAX_ANSWER])
    while view:
        view = view[os.write(fd, view):]


def _read_all(fd: int, deadline: float) -> bytes | None:
    """Everything until end of file; None when ``deadline`` passes first."""
    chunks: list[bytes] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
