"""Following a run while it happens: `postdeploy run --wait` and `logs --follow`.

The worker keeps only the tail of a run's output in Redis, with the total byte
count; we print what is new since the last look and say how much we missed
when the tail moved past us.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import BinaryIO

from postdeploy.errors import PostdeployError
from postdeploy.store.records import RunRecord, Status
from postdeploy.store.state import StateStore

POLL = 0.5  # seconds between looks at the run
QUEUED_NOTICE_EVERY = 15.0  # seconds between "still waiting for a worker" lines


class OutputFollower:
    """Prints the part of a run's output not printed yet."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.printed = 0  # bytes of the run's whole output printed or skipped so far

    def feed(self, tail: bytes, total: int) -> None:
        new = total - self.printed
        if new <= 0:
            return
        if new > len(tail):
            self.out.write(f"... {new - len(tail)} bytes skipped ...\n".encode())
            chunk = tail
        else:
            chunk = tail[len(tail) - new:]
        self.out.write(chunk)
        self.out.flush()
        self.printed = total


def follow_run(store: StateStore, run_id: str, out: BinaryIO,
               progress: Callable[[str], None], poll: float = POLL) -> RunRecord:
    """Stream the run's output to ``out`` until it finishes; return its final record."""
    follower = OutputFollower(out)
    queued_since = time.monotonic()
    next_notice = 0.0
    announced_start = False
    while True:
        record = store.get_run(run_id)
        if record is None:
            raise PostdeployError(f"run {run_id} disappeared from the history "
                                  "(history limit reached?)")
        # Output is written before the record is marked finished, so read it after.
        follower.feed(*store.read_output(run_id))
        status = Status(record.status)
        if status.finished:
            return record
        if status == Status.QUEUED:
            if time.monotonic() >= next_notice:
                waited = time.monotonic() - queued_since
                progress("waiting for a worker..." if waited < 1 else
                         f"still waiting for a worker ({waited:.0f} s); "
                         "is `postdeploy up` (or a worker) running?")
                next_notice = time.monotonic() + QUEUED_NOTICE_EVERY
        elif status == Status.WAITING:
            if time.monotonic() >= next_notice:
                progress(f"waiting for the app to be ready on {record.host or 'its host'}"
                         + (f": {record.reason}" if record.reason else ""))
                next_notice = time.monotonic() + QUEUED_NOTICE_EVERY
        elif not announced_start:
            progress(f"running on {record.worker or 'a worker'}")
            announced_start = True
        time.sleep(poll)
