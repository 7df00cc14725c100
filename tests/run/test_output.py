"""Job output capture: masking, line cutting, prefixes and control characters.

The bytes come from real bash processes where the point is what a job prints,
and are fed directly where the point is how reads are split.
"""

from __future__ import annotations

import io
import logging
import os
import tracemalloc
from pathlib import Path

import pytest

from postdeploy.run.output import MAX_LINE, OutputCapture, TerminalOutput
from postdeploy.run.runner import run_process
from postdeploy.store.records import Status

LABEL = "app@1234567"
PREFIX = f"[POST-DEPLOY] {LABEL} | "


class Stored:
    """The tail and total as last handed to the store."""

    def __init__(self) -> None:
        self.tail = b""
        self.total = 0
        self.writes: list[bytes] = []

    def __call__(self, tail: bytes, total: int) -> None:
        self.tail, self.total = tail, total
        self.writes.append(tail)


def job_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "postdeploy.job"]


def run_job(command: str, cwd: Path, capture: OutputCapture) -> None:
    with run_process(command, cwd, {**os.environ, "POST_DEPLOY_RUN_ID": "t-output"},
                     1, "t-output", capture.feed, lambda: None, lambda: None) as outcome:
        capture.close()
    assert outcome.status == Status.SUCCEEDED, outcome


def test_a_secret_across_the_cut_of_a_long_line_is_masked(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="postdeploy.job")
    secret = "s3cr3t-value-0123456789"
    stored = Stored()
    capture = OutputCapture(LABEL, 4 * MAX_LINE, [secret], stored)
    capture.feed(b"a" * (MAX_LINE - 7) + secret.encode() + b"b" * 100)  # one read, no end
    capture.feed(b"\n")
    capture.close()
    logged = "\n".join(job_lines(caplog))
    assert "***" in logged and b"***" in stored.tail
    for piece in (secret, secret[:7], secret[7:]):  # neither half leaks anywhere
        assert piece not in logged
        assert piece.encode() not in b"".join(stored.writes)


def test_a_secret_across_two_reads_of_a_long_line_is_masked() -> None:
    secret = "another-secret-987654"
    stored = Stored()
    capture = OutputCapture(LABEL, 4 * MAX_LINE, [secret], stored)
    capture.feed(b"a" * (MAX_LINE - 5) + secret[:10].encode())
    capture.feed(secret[10:].encode() + b"tail\n")
    capture.close()
    assert secret[10:].encode() not in stored.tail
    assert stored.tail.count(b"***") == 1


def test_the_held_partial_line_stays_bounded_when_reads_are_large(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="postdeploy.job")  # 64 MiB of lines: not kept
    capture = OutputCapture(LABEL, 1024 * 1024, [], lambda tail, total: None)
    chunk = b"z" * (1024 * 1024)  # one read of 1 MiB, no newline in sight
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        peak_held = 0
        for _ in range(64):
            capture.feed(chunk)
            peak_held = max(peak_held, tracemalloc.get_traced_memory()[0] - before)
    finally:
        tracemalloc.stop()
    capture.close()
    # The tail (up to twice the limit before a trim) and one partial line, no more.
    assert peak_held < 4 * 1024 * 1024, peak_held


def test_long_lines_are_logged_in_pieces_and_stored_whole(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="postdeploy.job")
    stored = Stored()
    capture = OutputCapture(LABEL, 8 * MAX_LINE, [], stored)
    capture.feed(b"q" * (3 * MAX_LINE + 10) + b"\nnext\n")
    capture.close()
    lines = job_lines(caplog)
    assert [len(line) - len(PREFIX) for line in lines] == [MAX_LINE] * 3 + [10, 4]
    assert stored.tail == b"q" * (3 * MAX_LINE + 10) + b"\nnext\n"


def test_a_line_that_already_has_the_prefix_is_not_prefixed_twice(
        caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    caplog.set_level(logging.INFO, logger="postdeploy.job")
    stored = Stored()
    run_job("echo '[POST-DEPLOY] Seeding database...'; echo plain; "
            "echo '[POST-DEPLOY]done'", tmp_path,
            capture := OutputCapture(LABEL, 1024, [], stored))
    assert capture.total == len(stored.tail)
    assert job_lines(caplog) == [f"{PREFIX}Seeding database...", f"{PREFIX}plain",
                                 f"{PREFIX}done"]
    assert stored.tail.startswith(b"[POST-DEPLOY] Seeding database...\n")


def test_control_characters_are_escaped_in_log_lines_and_kept_in_the_tail(
        caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    caplog.set_level(logging.INFO, logger="postdeploy.job")
    stored = Stored()
    forged = ("x\\r2026-01-01 00:00:00,000 INFO    MainProcess postdeploy.job: "
              "[POST-DEPLOY] billing@1234567 | FORGED")
    run_job(f"printf '{forged}\\n'; printf 'bell\\a esc\\033[2J nul\\000 "
            "csi\\302\\233 del\\177 tab\\tok\\r\\n'", tmp_path,
            OutputCapture(LABEL, 4096, [], stored))
    first, second = job_lines(caplog)
    assert first.startswith(f"{PREFIX}x\\r2026-01-01")
    assert first.endswith("[POST-DEPLOY] billing@1234567 | FORGED")
    assert "\r" not in first
    assert second == (f"{PREFIX}bell\\x07 esc\\x1b[2J nul\\x00 csi\\x9b del\\x7f "
                      "tab\tok")  # a CRLF line end is a line end, not shown
    assert stored.tail.startswith(b"x\r2026-01-01")
    assert b"bell\x07 esc\x1b[2J nul\x00 csi\xc2\x9b del\x7f tab\tok\r\n" in stored.tail


def test_secrets_from_any_iterable_are_masked_longest_first(tmp_path: Path) -> None:
    stored = Stored()
    secrets = (s for s in ["token", "token-with-more", "", "PEM-line-one\nPEM-line-two"])
    run_job("echo token-with-more; echo a token; echo PEM-line-two", tmp_path,
            OutputCapture(LABEL, 4096, secrets, stored))
    assert stored.tail == b"***\na ***\n***\n"


def test_terminal_output_escapes_however_the_bytes_are_split() -> None:
    shown = io.StringIO()
    out = TerminalOutput(shown)
    data = "crlf\r\nlone\rcr é \x1b[31mred\n".encode()
    for index in range(len(data)):  # one byte per write: CRLF and é are split too
        out.write(data[index:index + 1])
    out.flush()
    assert shown.getvalue() == "crlf\nlone\\rcr é \\x1b[31mred\n"
