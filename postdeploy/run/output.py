"""Job output: logged line by line with the [POST-DEPLOY] prefix, tail kept for Redis.

Memory stays flat whatever the job prints: only the capped tail and one partial
line (at most MAX_LINE plus the longest secret) are held. Secrets are masked
before anything is logged or stored, also where a long line is cut; invalid
UTF-8 is replaced, never fatal. Log lines show control characters as escapes
(``\\r``, ``\\x1b``), so a job cannot forge another app's line on a terminal;
the stored tail keeps the bytes as printed.
"""

from __future__ import annotations

import codecs
import logging
import re
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import TextIO

from postdeploy.config.redaction import MASK

log = logging.getLogger("postdeploy.job")

MAX_LINE = 64 * 1024  # bytes; a longer line is logged in pieces of about this size
LOG_LINES_PER_SECOND = 1000  # beyond this the log gets a count, the tail keeps everything
FLUSH_EVERY = 0.25  # seconds between writes of the tail to Redis
JOB_PREFIX = "[POST-DEPLOY]"  # what the guide tells jobs to print; we add it ourselves
# A multi-line secret (a PEM key) is masked line by line; lines shorter than this
# ("}", "") would mask harmless text everywhere.
MIN_SECRET_LINE = 4

_MASK = MASK.encode()
# C0 and C1 controls, DEL and the Unicode line separators; tab and newline stay.
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")
# The ASCII ones as bytes: a line that is ASCII without them needs no escaping,
# which bytes.translate tells several times faster than the regular expression.
_ASCII_CONTROLS = bytes(range(0x20)).replace(b"\t", b"") + b"\x7f"


def escape_controls(text: str) -> str:
    """Show control characters (except tab and newline) visibly: ``\\r``, ``\\x1b``, ..."""
    return _CONTROLS.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code == 0x0D:
        return "\\r"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


class TerminalOutput:
    """A binary stream that writes job output to a terminal: UTF-8 decoded (invalid
    bytes replaced), CRLF line ends kept, other controls escaped, however the bytes
    are split between writes."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        # The last write ended with CR, which may be the first half of a CRLF: it is
        # shown with the next write (a lone CR at the very end shows nothing anyway).
        self._held_cr = False

    def write(self, data: bytes) -> int:
        text = ("\r" if self._held_cr else "") + self._decoder.decode(data)
        self._held_cr = text.endswith("\r")
        if self._held_cr:
            text = text[:-1]
        self.out.write(escape_controls(text.replace("\r\n", "\n")))
        return len(data)

    def flush(self) -> None:
        self.out.flush()


def secret_patterns(secrets: Iterable[str]) -> list[bytes]:
    """The byte strings to mask, longest first (so no part of a longer one is left)."""
    patterns: set[bytes] = set()
    for secret in secrets:
        if not secret:
            continue
        patterns.add(secret.encode())
        if "\n" in secret:
            patterns.update(line.encode() for line in secret.splitlines()
                            if len(line) >= MIN_SECRET_LINE)
    return sorted(patterns, key=len, reverse=True)


class OutputCapture:
    """Feed it bytes as they arrive; it logs lines and hands the tail to ``store``.

    ``secrets``: any strings to mask (the app's SECRET values and the executor's own).
    """

    def __init__(self, label: str, limit: int, secrets: Iterable[str],
                 store: Callable[[bytes, int], None]) -> None:
        self.prefix = f"[POST-DEPLOY] {label} | "
        self.limit = limit
        self.secrets = secret_patterns(secrets)
        self.store = store
        # A partial line this long is cut: the bytes after the cut show whether a
        # secret or a UTF-8 character crosses it, so the cut can be moved before it.
        self._hold = MAX_LINE + max((len(s) for s in self.secrets), default=1)
        # The tail as the chunks we were fed, masked only when written to Redis (a few
        # times a second): searching every byte for every secret would cost more than
        # the pipe itself, and most bytes of a chatty job are trimmed unseen.
        self._chunks: deque[bytes | memoryview] = deque()
        self._unmasked = 0  # chunks at the right end of _chunks not masked yet
        self._held = 0  # bytes in _chunks
        self._trimmed = 0  # bytes dropped from the left of _chunks
        self._partial = b""
        self._dirty = False
        self._last_flush = 0.0
        self._window_start = 0.0
        self._window_lines = 0
        self._suppressed = 0  # bytes not logged in this window

    @property
    def total(self) -> int:
        """Bytes of output so far; after a flush, counted with secrets masked."""
        return self._trimmed + self._held

    def feed(self, data: bytes) -> None:
        end = data.rfind(b"\n") + 1
        if not end:  # still inside one line
            self._cut_long_line(self._partial + data, 0)
        else:
            # Reads are copied as little as possible (views, not slices): at pipe
            # speed, a copy of each read costs a fifth of the time there is.
            start = 0
            if self._partial:  # only its own first line joins the held part
                start = data.find(b"\n") + 1
                self._keep(self._partial + data[:start], True)
            if start < end:
                self._keep(data if start == 0 and end == len(data)
                           else memoryview(data)[start:end], True)
            self._partial = b""
            if end < len(data):
                self._cut_long_line(data[end:], 0)
        self.flush_if_due()

    def close(self) -> None:
        """Keep the last unterminated line, report suppressed lines, write the tail."""
        if self._partial:
            self._keep(self._partial + b"\n", True)
            self._partial = b""
        self._report_suppressed()
        self.flush()

    def note(self, text: str) -> None:
        """Add a line of our own (e.g. why the job was stopped) to log and tail."""
        if self._partial:  # the job's unfinished line ends here, before ours
            self._keep(self._partial + b"\n", True)
            self._partial = b""
        self._keep(f"{text}\n".encode(), True)

    def flush_if_due(self) -> None:
        if self._dirty and time.monotonic() - self._last_flush >= FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        if self._dirty:
            self._dirty = False
            self._mask_new_chunks()
            self.store(b"".join(self._chunks)[-self.limit:], self.total)

    def _mask_new_chunks(self) -> None:
        # Chunks end at a line end or at a cut moved before any secret, so masking
        # them one by one finds every secret.
        new = [self._chunks.pop() for _ in range(self._unmasked)]
        for chunk in reversed(new):
            masked = self._mask(bytes(chunk))
            self._held += len(masked) - len(chunk)
            self._chunks.append(masked)
        self._unmasked = 0

    def _mask(self, data: bytes) -> bytes:
        for secret in self.secrets:
            if secret in data:
                data = data.replace(secret, _MASK)
        return data

    def _cut_long_line(self, data: bytes, start: int) -> None:
        """Keep pieces of the unterminated line from ``start``; hold back the rest."""
        while len(data) - start >= self._hold:
            cut = self._cut_point(data, start)
            self._keep(data[start:cut], False)
            start = cut
        self._partial = data[start:]

    def _cut_point(self, data: bytes, start: int) -> int:
        """About MAX_LINE after ``start``, never inside a UTF-8 character or a secret."""
        cut = start + MAX_LINE
        for _ in range(3):  # back to the start of a character (at most 3 continuation bytes)
            if data[cut] & 0xC0 != 0x80:
                break
            cut -= 1
        moved = True
        while moved:  # cuts only move left, so this ends
            moved = False
            for secret in self.secrets:
                size = len(secret)
                at = data.find(secret, max(start, cut - size + 1), cut + size - 1)
                if at < 0 or at >= cut:
                    continue
                if at == start:  # a secret longer than a piece: the piece ends after it
                    return at + size
                cut, moved = at, True
        return cut

    def _keep(self, data: bytes | memoryview, ends_line: bool) -> None:
        self._chunks.append(data)
        self._unmasked += 1
        self._held += len(data)
        while self._held - len(self._chunks[0]) >= self.limit:
            dropped = len(self._chunks.popleft())
            self._held -= dropped
            self._trimmed += dropped
            self._unmasked = min(self._unmasked, len(self._chunks))
        self._dirty = True
        self._log_lines(data, ends_line)

    def _log_lines(self, data: bytes | memoryview, ends_line: bool) -> None:
        now = time.monotonic()
        if now - self._window_start >= 1.0:
            self._report_suppressed()
            self._window_start, self._window_lines = now, 0
        budget = LOG_LINES_PER_SECOND - self._window_lines
        if budget <= 0:  # counted in bytes: counting lines would cost a pass over them
            self._suppressed += len(data)
            return
        if not ends_line:  # a piece of a long line, itself without a newline
            self._log_line(self._mask(bytes(data)))
            self._window_lines += 1
            return
        lines = bytes(data).split(b"\n", budget)
        # `data` ends with a newline, so the last piece is either empty (every
        # line fits the budget) or the remainder holding the lines over it.
        self._suppressed += len(lines.pop())
        for line in lines:
            if line.endswith(b"\r"):  # a CRLF line end is a line end
                line = line[:-1]
            line = self._mask(line)  # whole, before it is cut into pieces
            for begin in range(0, len(line) or 1, MAX_LINE):
                self._log_line(line[begin:begin + MAX_LINE])
                self._window_lines += 1

    def _log_line(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace")
        if not line.isascii() or len(line.translate(None, _ASCII_CONTROLS)) != len(line):
            text = escape_controls(text)
        if text.startswith(JOB_PREFIX):  # the job said it itself; say it once
            text = text[len(JOB_PREFIX):].removeprefix(" ")
        log.info("%s%s", self.prefix, text)

    def _report_suppressed(self) -> None:
        if self._suppressed:
            log.info("%s... %d bytes not logged (output faster than %d lines/s); "
                     "`postdeploy logs` shows the stored tail",
                     self.prefix, self._suppressed, LOG_LINES_PER_SECOND)
            self._suppressed = 0
