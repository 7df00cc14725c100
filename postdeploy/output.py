"""Job output: logged line by line with the [POST-DEPLOY] prefix, tail kept for Redis.

Memory stays flat whatever the job prints: only the capped tail and one partial
line are held. Secrets are masked before anything is logged or stored, and
invalid UTF-8 is replaced, never fatal.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from postdeploy.redaction import MASK

log = logging.getLogger("postdeploy.job")

MAX_LINE = 64 * 1024  # bytes; a longer line is cut into pieces of this size
LOG_LINES_PER_SECOND = 1000  # beyond this the log gets a count, the tail keeps everything
FLUSH_EVERY = 0.25  # seconds between writes of the tail to Redis


class OutputCapture:
    """Feed it bytes as they arrive; it logs lines and hands the tail to ``store``."""

    def __init__(self, label: str, limit: int, secrets: Iterable[str],
                 store: Callable[[bytes, int], None]) -> None:
        self.prefix = f"[POST-DEPLOY] {label} | "
        self.limit = limit
        self.secrets = [s.encode() for s in secrets if s]
        self.store = store
        self.total = 0  # bytes kept so far (after masking), including trimmed ones
        self._tail = bytearray()
        self._partial = b""
        self._dirty = False
        self._last_flush = 0.0
        self._window_start = 0.0
        self._window_lines = 0
        self._suppressed = 0

    def feed(self, data: bytes) -> None:
        data = self._partial + data
        cut = data.rfind(b"\n")
        if cut < 0:
            if len(data) < MAX_LINE:
                self._partial = data
                return
            complete, self._partial = data[:MAX_LINE] + b"\n", data[MAX_LINE:]
        else:
            complete, self._partial = data[:cut + 1], data[cut + 1:]
        self._keep(complete)
        self.flush_if_due()

    def close(self) -> None:
        """Keep the last unterminated line, report suppressed lines, write the tail."""
        if self._partial:
            self._keep(self._partial + b"\n")
            self._partial = b""
        self._report_suppressed()
        self.flush()

    def note(self, text: str) -> None:
        """Add a line of our own (e.g. why the job was stopped) to log and tail."""
        self._keep(f"{text}\n".encode())

    def flush_if_due(self) -> None:
        if self._dirty and time.monotonic() - self._last_flush >= FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        if self._dirty:
            self._dirty = False
            self.store(bytes(self._tail[-self.limit:]), self.total)

    def _keep(self, complete: bytes) -> None:
        for secret in self.secrets:
            complete = complete.replace(secret, MASK.encode())
        self.total += len(complete)
        self._tail += complete
        if len(self._tail) > 2 * self.limit:  # trim in batches: amortised O(1) per byte
            del self._tail[:-self.limit]
        self._dirty = True
        self._log_lines(complete)

    def _log_lines(self, complete: bytes) -> None:
        now = time.monotonic()
        if now - self._window_start >= 1.0:
            self._report_suppressed()
            self._window_start, self._window_lines = now, 0
        budget = LOG_LINES_PER_SECOND - self._window_lines
        if budget <= 0:
            self._suppressed += complete.count(b"\n")
            return
        lines = complete.split(b"\n", budget)
        # `complete` ends with a newline, so the last piece is either empty (every
        # line fits the budget) or the remainder holding the lines over it.
        self._suppressed += lines.pop().count(b"\n")
        for line in lines:
            log.info("%s%s", self.prefix, line.decode("utf-8", "replace").rstrip("\r"))
        self._window_lines += len(lines)

    def _report_suppressed(self) -> None:
        if self._suppressed:
            log.info("%s... %d lines not logged (output faster than %d lines/s); "
                     "`postdeploy logs` shows the stored tail",
                     self.prefix, self._suppressed, LOG_LINES_PER_SECOND)
            self._suppressed = 0
