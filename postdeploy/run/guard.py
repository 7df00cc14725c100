"""The job guard: one small process between a worker and each running job.

Why a process of its own, forked from the worker's pool process (cheap: no exec):

- It is the job's *child subreaper* (Linux PR_SET_CHILD_SUBREAPER), so every
  descendant of the job stays its descendant, however it tried to leave
  (``setsid``, double fork, ``env -i``): stopping the job walks the kernel's
  process tree, not markers a job can shed.
- It renews the run's lease (the app's run lock and the deployment's claim) in
  Redis itself, so a worker that stalls (GC pause, SIGSTOP, VM freeze) does not let the
  lease lapse while the job still runs. It fences by its own clock (see
  :mod:`postdeploy.run.lease`): with no successful renewal for half the lease, it
  stops the job, and has it dead before the lease can lapse, whatever state its
  Redis calls are in, so a second host never starts a second copy while the
  first lives. After the job ends it keeps the lease until the worker has
  recorded the run, so a slow final write never lets the commit run twice.
- It watches the run's cancel key (``postdeploy cancel``, Flower's revoke) and
  the worker itself (its control pipe: end of file means the worker died).
- It starts the job as the job user, in a mount namespace that hides the
  executor's state and the other apps, when it can (see :mod:`postdeploy.run.sandbox`).

The worker talks to it through two pipes: a control pipe (``stop <reason>``,
``done``) and a report pipe (JSON lines: the job's pid, log lines, the outcome).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import select
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from postdeploy.run import processes
from postdeploy.run.lease import TICK, Lease, LeaseKeeper, lease_clock
from postdeploy.run.sandbox import Sandbox
from postdeploy.run.stop import Stop, StopKind

__all__ = ["GuardHandle", "GuardResult", "GuardSpec", "Lease", "Sandbox", "start_guard"]
STOP_POLL = 0.05  # seconds between looks while waiting for stopped processes to go
KILL_ROUNDS = 20  # SIGKILL sweeps: a job forking while it is killed cannot outrun them
GUARD_NAME = b"postdeploy-guard"  # the process name (comm) `up` looks for at shutdown

@dataclass(frozen=True)
class GuardSpec:
    command: str
    cwd: str
    env: dict[str, str]
    grace: float  # seconds between SIGTERM and SIGKILL
    lease: Lease | None = None
    sandbox: Sandbox = field(default_factory=Sandbox)


@dataclass(frozen=True)
class GuardResult:
    """How the job ended: an exit code, or the signal that killed it, and why it was stopped."""

    exit_code: int | None  # negative: killed by that signal
    stopped: Stop | None = None  # why the guard stopped it (None: it ended by itself)
    start_error: str | None = None  # the job could not be started at all

    @classmethod
    def from_message(cls, data: dict[str, Any]) -> GuardResult:
        return cls(data.get("exit_code"), Stop.from_message(data.get("stopped")),
                   data.get("start_error"))


class GuardHandle:
    """The worker's side: start, stop, and collect the outcome of one guarded job."""

    def __init__(self, pid: int, control: int, report: int) -> None:
        self.pid = pid
        self.job_pid: int | None = None
        self.result: GuardResult | None = None
        self._control = control
        self._report = report
        self._buffer = b""
        self._on_log: Callable[[str], None] = lambda _line: None

    def stop(self, reason: str) -> None:
        """Ask the guard to stop the job (SIGTERM, grace, SIGKILL of every descendant)."""
        self._send(f"stop {reason}\n")

    def poll(self, wait: float = 0.0) -> GuardResult | None:
        """Read what the guard reported (waiting up to ``wait``); the outcome once known."""
        if self.result is None and self._report >= 0:
            readable, _, _ = select.select([self._report], [], [], wait)
            if readable:
                chunk = os.read(self._report, 65536)
                if not chunk:
                    self._close_report()
                    if self.result is None:
                        self.result = GuardResult(None, Stop(StopKind.GUARD_DIED,
                                                             "the job guard died"))
                self._buffer += chunk
                self._handle_lines()
        return self.result

    def wait(self, timeout: float) -> GuardResult | None:
        deadline = time.monotonic() + timeout
        while self.result is None and time.monotonic() < deadline:
            self.poll(min(TICK, max(0.0, deadline - time.monotonic())))
        return self.result

    def finish(self) -> None:
        """The run is recorded: the guard lets the lease go and exits.

        Returns once the guard has stopped renewing the lease (it then closes its
        report pipe), not once it has exited: unmapping its copy of the worker takes
        a few ms more, and it is reaped later (see reap_guards).
        """
        self._send("done\n")
        with contextlib.suppress(OSError):
            os.close(self._control)
        self._control = -1
        if self._report >= 0:
            os.set_blocking(self._report, True)
            with contextlib.suppress(OSError):
                while os.read(self._report, 65536):
                    pass
        self._close_report()
        _exiting.add(self.pid)
        reap_guards()

    def _send(self, text: str) -> None:
        if self._control >= 0:
            with contextlib.suppress(BrokenPipeError, OSError):
                os.write(self._control, text.encode())

    def _close_report(self) -> None:
        if self._report >= 0:
            os.close(self._report)
            self._report = -1

    def _handle_lines(self) -> None:
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            try:
                message: dict[str, Any] = json.loads(line)
            except ValueError:
                continue
            if "job_pid" in message:
                self.job_pid = int(message["job_pid"])
            if "log" in message:
                self._on_log(str(message["log"]))
            if "result" in message:
                self.result = GuardResult.from_message(message["result"])


_exiting: set[int] = set()  # guards that let their lease go, maybe not yet reaped


def reap_guards() -> None:
    """Reap the guards that have exited since (zombies until then, holding nothing)."""
    for pid in list(_exiting):
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done = pid
        if done:
            _exiting.discard(pid)


def start_guard(spec: GuardSpec, output_fd: int,
                on_log: Callable[[str], None] = lambda _line: None) -> GuardHandle:
    """Fork the guard; it starts the job with ``output_fd`` as stdout and stderr."""
    reap_guards()
    control_r, control_w = os.pipe()
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the guard: never return into the worker's code
        code = 70
        try:
            keep = {control_r, report_w, output_fd}
            code = _guard_main(spec, control_r, report_w, output_fd, keep)
        except BaseException as exc:  # noqa: B036 (report anything, then leave)
            with contextlib.suppress(Exception):
                os.write(report_w, _line({"log": f"job guard failed: {exc!r}"}))
        finally:
            os._exit(code)
    os.close(control_r)
    os.close(report_w)
    handle = GuardHandle(pid, control_w, report_r)
    handle._on_log = on_log
    return handle


# -- inside the guard ---------------------------------------------------------


def _guard_main(spec: GuardSpec, control: int, report: int, output_fd: int,
                keep: set[int]) -> int:
    # A forked copy of a worker: no collector runs the worker's finalizers on fds we
    # close below, and the worker's signal handlers are not ours.
    gc.disable()
    os.setsid()  # a stop of the worker's process group (SIGSTOP, Ctrl-C) does not reach us
    processes.detach_fds(keep)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1,
                signal.SIGUSR2, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)
    # A child's exit wakes the guard's select at once (through this pipe), not a tick later.
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    terminated: list[str] = []
    signal.signal(signal.SIGTERM, lambda *_: terminated.append("the executor is stopping"))
    processes.prctl(processes.PR_SET_NAME, GUARD_NAME)
    processes.prctl(processes.PR_SET_CHILD_SUBREAPER, 1)
    guard = _Guard(spec, control, report, terminated, wake_r)
    return guard.run(output_fd)


class _Guard:
    def __init__(self, spec: GuardSpec, control: int, report: int,
                 terminated: list[str], wake: int) -> None:
        self.spec = spec
        self.wake = wake
        self.control = control
        self.report = report
        self.terminated = terminated
        self.keeper: LeaseKeeper | None = None
        self.worker_gone = False
        self.done = False
        self._control_buffer = b""

    def run(self, output_fd: int) -> int:
        from postdeploy.run.sandbox import enter_sandbox  # the job's side of the sandbox

        spec = self.spec
        refused: list[Stop] = []

        def lease_holds() -> bool:
            # Checked while the job's process gets ready: the worker took the lease a
            # while ago (git work), and a lease already lost or cancelled starts nothing.
            if self.keeper is not None and (stop := self.keeper.renew_now()) is not None:
                refused.append(stop)
            return not refused

        self.keeper = LeaseKeeper(spec.lease) if spec.lease is not None else None
        try:
            job_pid = processes.spawn_job(spec.command, spec.cwd, spec.env, output_fd,
                                          lambda: enter_sandbox(spec.sandbox), lease_holds)
        except OSError as exc:
            os.close(output_fd)
            self._send({"result": asdict(GuardResult(None, None, str(exc)))})
            self._hold_until_done()
            return 0
        if job_pid is None:
            os.close(output_fd)
            self._send({"result": asdict(GuardResult(None, refused[0].later(
                ", before the job started")))})
            self._hold_until_done()
            return 0
        os.close(output_fd)  # only the job holds the output pipe now: EOF when it is done
        if self.keeper is not None:
            self.keeper.start()  # a thread: only now, after the guard's last fork
        self._send({"job_pid": job_pid})
        status, stopped = self._watch(job_pid)
        self._send({"result": asdict(GuardResult(processes.exit_code(status), stopped))})
        self._hold_until_done()
        return 0

    def _watch(self, job_pid: int) -> tuple[int | None, Stop | None]:
        """Until the job exits; stop it (and every descendant) when asked or fenced."""
        while True:
            status = processes.reap_children(job_pid)
            if status is not None:
                return status, None
            stop = self._tick()
            if stop is not None:
                # The job's own end wins over a verdict formed meanwhile: it ended while
                # the lease still held (the lease lapses only well after the verdict).
                status = processes.reap_children(job_pid)
                if status is not None:
                    return status, None
                return self._stop_job(job_pid, stop), stop

    def _tick(self) -> Stop | None:
        """One look at the control pipe, the lease and the cancel key; a stop reason or None."""
        wait = TICK if self.keeper is None else max(0.0, min(TICK, self.keeper.until_fence()))
        command = self._read_control(wait)
        if command is not None and command.startswith("stop"):
            return Stop(StopKind.ASKED, command[5:].strip() or "stopped")
        if self.worker_gone:
            return Stop(StopKind.WORKER_GONE, "its worker stopped")
        if self.terminated:
            return Stop(StopKind.TERMINATED, self.terminated[0])
        return self.keeper.look() if self.keeper is not None else None

    def _stop_job(self, job_pid: int, stop: Stop) -> int | None:
        """SIGTERM the job and all its descendants, wait the grace, then SIGKILL the rest.

        The grace never outlasts the lease: whatever the reason, every process is
        SIGKILLed before the lease could lapse (see :mod:`postdeploy.run.lease`).
        """
        status: int | None = None
        processes.signal_descendants(signal.SIGTERM)
        grace_ends = lease_clock() + self.spec.grace
        fenced = stop.kind == StopKind.LEASE_LOST
        while True:
            kill_at = grace_ends if self.keeper is None else min(grace_ends,
                                                                 self.keeper.kill_by())
            if lease_clock() >= kill_at:
                break
            status = processes.reap_children(job_pid) if status is None else status
            if not processes.live_descendants():
                break
            time.sleep(min(STOP_POLL, max(0.0, kill_at - lease_clock())))
            if self.keeper is not None and not fenced:
                self.keeper.look()  # a cancel or a timeout keeps the lease meanwhile
        for _ in range(KILL_ROUNDS):
            if not processes.signal_descendants(signal.SIGKILL):
                break
            time.sleep(STOP_POLL)
            status = processes.reap_children(job_pid) if status is None else status
        status = processes.reap_children(job_pid) if status is None else status
        return status

    def _hold_until_done(self) -> None:
        """Keep the lease until the worker has recorded the run (or is gone)."""
        if self.keeper is not None:
            self.keeper.start()  # (already running, unless the job never started)
        while not self.done and not self.worker_gone:
            processes.reap_children(None)
            self._read_control(TICK)
            if self.keeper is not None:
                self.keeper.look()
        # No renewal from here on: the worker may release the lease once it reads EOF.
        with contextlib.suppress(OSError):
            os.close(self.report)
        self.report = -1

    def _read_control(self, wait: float) -> str | None:
        """Wait up to ``wait`` for a command, a child's exit or a signal; the command if any."""
        watched = [self.wake] if self.worker_gone else [self.control, self.wake]
        try:
            readable, _, _ = select.select(watched, [], [], wait)
        except InterruptedError:
            return None
        if self.wake in readable:
            with contextlib.suppress(BlockingIOError, OSError):
                os.read(self.wake, 512)
        if self.control not in readable or self.worker_gone:
            return None
        chunk = os.read(self.control, 4096)
        if not chunk:
            self.worker_gone = True
            return None
        self._control_buffer += chunk
        command = None
        while b"\n" in self._control_buffer:
            line, self._control_buffer = self._control_buffer.split(b"\n", 1)
            text = line.decode(errors="replace")
            if text == "done":
                self.done = True
            elif command is None:
                command = text
        return command

    def _send(self, message: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):
            os.write(self.report, _line(message))


def _line(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode() + b"\n"

