"""The one clock of a job's deadline, and the other way a job is told to stop.

The clock is Celery's soft time limit, which equals POST_DEPLOY_TIMEOUT: the
pool counts it from the moment a worker process starts the run, so the checkout
and the appspec read count toward it, and delivers it to the pool process as
SIGUSR1. A run sent without a soft limit (Flower's async-apply with only
kwargs, a manual run of a commit whose timeout no earlier run had read) gets
the same signal from a timer armed here, counting from the same moment, as
soon as the appspec says the timeout. The hard time limit (soft + grace +
margin) stays Celery's backstop for a pool process that no longer responds.

While git works, the signal raises SoftTimeLimitExceeded to cut it short;
while the job process runs it only raises a flag that the runner polls, so it
can never interrupt a Redis write half-way. SIGTERM, which Celery sends to the
pool process for a revoke with terminate, is turned into a stop request the
same way, so the pool process outlives it; a SIGTERM that was not a revoke
(the worker shutting down) is passed on when the run is over. An operator's
cancel, read from Redis by the job's tick, is a stop request too.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType, TracebackType
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from postdeploy.run.runner import StopRequest
from postdeploy.store.records import Status

log = logging.getLogger(__name__)

DEADLINE_SIGNAL = signal.SIGUSR1  # what Celery's pool sends at the soft time limit
TERMINATE_SIGNAL = signal.SIGTERM  # what Celery's pool sends for a revoke with terminate


class JobClock:
    """Stop requests for one run, in the pool process that runs it (a context manager).

    ``soft_limit`` is the soft time limit the message carries (None: none);
    ``started`` the ``time.monotonic()`` at which the worker started the run.
    """

    def __init__(self, soft_limit: float | None, started: float | None = None) -> None:
        self.soft_limit = soft_limit
        self.started = time.monotonic() if started is None else started
        self.timeout: float | None = soft_limit
        self.deadline_passed = False
        self.terminated = False
        self.terminate_handled = False
        self.cancel_reason: str | None = None
        self._interruptible = False
        self._timer: threading.Timer | None = None
        self._previous: dict[int, Any] = {}
        self._installed = False

    def __enter__(self) -> JobClock:
        try:
            for sig, handler in ((DEADLINE_SIGNAL, self._on_deadline),
                                 (TERMINATE_SIGNAL, self._on_terminate)):
                self._previous[sig] = signal.signal(sig, handler)
            self._installed = True
        except ValueError:  # not the main thread: only the timer can tell us
            log.debug("job clock without signal handlers (not in the main thread)")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self.terminated and not self.terminate_handled:
            # Not a revoke: the worker is shutting down. Die of it now, as Celery expects.
            log.warning("pool process got SIGTERM mid-run; stopping as asked")
            os.kill(os.getpid(), TERMINATE_SIGNAL)

    def arm(self, timeout: int) -> None:
        """The appspec's POST_DEPLOY_TIMEOUT is known: stand in for a missing soft limit."""
        if self.soft_limit is not None or self._timer is not None:
            return
        self.timeout = timeout
        remaining = max(0.0, timeout - (time.monotonic() - self.started))
        self._timer = threading.Timer(remaining, self._ring)
        self._timer.daemon = True
        self._timer.start()

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        """Within this block the deadline raises SoftTimeLimitExceeded (git work)."""
        if self.deadline_passed:
            raise SoftTimeLimitExceeded()
        self._interruptible = True
        try:
            yield
        finally:
            self._interruptible = False

    def cancel(self, reason: str) -> None:
        """An operator cancelled the run (``postdeploy cancel``, a revoke): stop the job."""
        self.cancel_reason = reason

    def stop_request(self) -> StopRequest | None:
        """Why the job must stop now, or None; the runner asks about every tick."""
        if self.cancel_reason is not None:
            return StopRequest(Status.CANCELLED, self.cancel_reason)
        if self.terminated:
            return StopRequest(Status.CANCELLED, "stopped by SIGTERM to its worker process")
        if self.deadline_passed:
            return StopRequest(Status.TIMED_OUT, self.timeout_reason())
        return None

    def timeout_reason(self) -> str:
        limit = f"{self.timeout:g} s" if self.timeout is not None else "its time limit"
        return f"timed out after {limit} (POST_DEPLOY_TIMEOUT)"

    def _ring(self) -> None:
        if self._installed:
            os.kill(os.getpid(), DEADLINE_SIGNAL)  # same path as Celery's own soft limit
        else:
            self.deadline_passed = True

    def _on_deadline(self, _signum: int, _frame: FrameType | None) -> None:
        self.deadline_passed = True
        if self._interruptible:
            raise SoftTimeLimitExceeded()

    def _on_terminate(self, _signum: int, _frame: FrameType | None) -> None:
        self.terminated = True
