"""Keeping a set of child processes running together, and stopping all of them.

Used by `postdeploy up`: each child runs in its own process group (so Ctrl-C in
the terminal reaches only us and we decide the order), its output is streamed
with a name prefix, and every child and grandchild carries a marker variable in
its environment. Stopping sends SIGTERM to each group and to every marked
process (job processes live in groups of their own), waits, then SIGKILLs
whatever is left. A child that exits on its own stops everything: a half-alive
executor would look healthy while doing nothing.

Daemons that a *succeeded* job started on purpose (the guide's `pm2 start`)
belong to the app, not to us: a process whose run (its POST_DEPLOY_RUN_ID)
``keep`` says succeeded is left running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import BinaryIO

import psutil

from postdeploy.run.processes import die_with_parent, processes_with_env

MARKER_VAR = "POST_DEPLOY_UP_ID"  # inherited by jobs: the worker hides POSTDEPLOY_* from them
RUN_VAR = "POST_DEPLOY_RUN_ID"  # every job process carries its run's id
STOP_TIMEOUT = 5.0  # seconds between SIGTERM and SIGKILL at shutdown
POLL = 0.2  # seconds between looks at the children


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    reader: threading.Thread | None = None


class ChildDied(Exception):
    """A supervised process exited while it should have been running."""

    def __init__(self, name: str, returncode: int) -> None:
        how = (f"was killed by signal {-returncode}" if returncode < 0
               else f"exited with status {returncode}")
        super().__init__(f"{name} {how}; stopping everything (see its output above)")
        self.name = name
        self.returncode = returncode


class Supervisor:
    """Start named children, stream their output, stop them all on request."""

    def __init__(self, marker: str, out: BinaryIO | None = None,
                 stop_timeout: float = STOP_TIMEOUT,
                 keep: Callable[[str], bool] | None = None) -> None:
        self.marker = marker
        self.stop_timeout = stop_timeout
        self.keep = keep  # run id -> True when that run's processes are the app's daemons
        self.children: list[Child] = []
        self._out = out or sys.stdout.buffer
        self._out_lock = threading.Lock()
        self._stop_requested: int | None = None
        self._width = 6

    def child_env(self, env: Mapping[str, str]) -> dict[str, str]:
        return {**env, MARKER_VAR: self.marker, "PYTHONUNBUFFERED": "1"}

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str]) -> Child:
        """Start ``argv`` in its own process group; output is prefixed with ``name``."""
        proc = subprocess.Popen(
            list(argv), env=self.child_env(env), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=die_with_parent)
        child = Child(name, proc)
        self.children.append(child)
        self._width = max(self._width, len(name))
        return child

    def stream(self) -> None:
        """Start copying every child's output (after all are spawned: fork + threads)."""
        for child in self.children:
            if child.reader is None:
                child.reader = threading.Thread(target=self._copy, args=(child,), daemon=True,
                                                name=f"output-{child.name}")
                child.reader.start()

    def say(self, text: str) -> None:
        """A line of our own, kept apart from the children's lines."""
        with self._out_lock:
            self._out.write(text.encode() + b"\n")
            self._out.flush()

    def watch(self, also_alive: Callable[[], str | None] | None = None) -> int | None:
        """Block until a stop signal (return it) or a child dies (raise ChildDied).

        ``also_alive`` checks a process we do not own (the embedded Redis): it
        returns a problem description, or None while all is well.
        """
        previous = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            while self._stop_requested is None:
                for child in self.children:
                    code = child.proc.poll()
                    if code is not None:
                        raise ChildDied(child.name, code)
                problem = also_alive() if also_alive else None
                if problem:
                    raise ChildDied(problem, 1)
                time.sleep(POLL)
            return self._stop_requested
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def stop(self) -> None:
        """SIGTERM every child group and marked process; SIGKILL what outlives the wait."""
        # A second Ctrl-C while we wait means "now": go straight to SIGKILL.
        hurry = threading.Event()
        previous = {sig: signal.signal(sig, lambda *_: hurry.set())
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            kept: dict[str, bool] = {}  # run id -> kept, asked once per stop
            self._signal_all(signal.SIGTERM, kept)
            deadline = time.monotonic() + self.stop_timeout
            while time.monotonic() < deadline and not hurry.is_set():
                if not self._running_children() and not self._to_stop(kept):
                    break
                hurry.wait(POLL)
            self._signal_all(signal.SIGKILL, kept)
            for child in self.children:
                try:
                    child.proc.wait(5)
                except subprocess.TimeoutExpired:
                    pass
            # Killed processes vanish asynchronously; give the kernel a moment.
            end = time.monotonic() + 5
            while self._to_stop(kept) and time.monotonic() < end:
                time.sleep(0.05)
            for child in self.children:
                if child.reader is not None:
                    child.reader.join(1)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._stop_requested = signum

    def _running_children(self) -> list[Child]:
        return [c for c in self.children if c.proc.poll() is None]

    def _to_stop(self, kept: dict[str, bool]) -> list[psutil.Process]:
        """Marked processes, less those of runs that succeeded (the app's daemons)."""
        found = []
        for proc in marked_processes(self.marker):
            try:
                run_id = proc.environ().get(RUN_VAR)
            except psutil.Error:
                continue
            if run_id and self.keep is not None:
                if run_id not in kept:
                    kept[run_id] = self._keeps(run_id)
                if kept[run_id]:
                    continue
            found.append(proc)
        return found

    def _keeps(self, run_id: str) -> bool:
        assert self.keep is not None
        try:
            return self.keep(run_id)
        except Exception:  # cannot tell (Redis gone?): stop it, as before daemons were kept
            return False

    def _signal_all(self, sig: int, kept: dict[str, bool]) -> None:
        for child in self._running_children():
            _signal_group(child.proc.pid, sig)
        for proc in self._to_stop(kept):
            try:
                proc.send_signal(sig)
                # Jobs run in groups of their own: take their children along.
                pgid = os.getpgid(proc.pid)
                # (A group holds one run's processes only: never a kept daemon.)
                if pgid == proc.pid and pgid != os.getpgrp():
                    _signal_group(pgid, sig)
            except (psutil.Error, ProcessLookupError):
                pass

    def _copy(self, child: Child) -> None:
        prefix = f"{child.name:<{self._width}} | ".encode()
        assert child.proc.stdout is not None
        writable = True
        for line in iter(child.proc.stdout.readline, b""):
            if not writable:
                continue  # keep draining so the child never blocks on a full pipe
            with self._out_lock:
                try:
                    self._out.write(prefix + line.rstrip(b"\n") + b"\n")
                    self._out.flush()
                except (OSError, ValueError):
                    writable = False  # our stdout is gone (closed pipe or terminal)
        child.proc.stdout.close()



def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def marked_processes(marker: str) -> list[psutil.Process]:
    """Live (non-zombie) processes whose environment carries ``MARKER_VAR=marker``."""
    found: list[psutil.Process] = []
    for pid in processes_with_env(MARKER_VAR, marker):
        try:
            found.append(psutil.Process(pid))
        except psutil.Error:
            continue
    return found
