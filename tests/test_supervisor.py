"""The supervisor of `postdeploy up`: real child processes, real signals."""

from __future__ import annotations

import io
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest

from postdeploy.supervisor import ChildDied, Supervisor, marked_processes
from tests.clirun import all_dead, cli_env, family, start_up
from tests.support import GitRemote, appspec_yaml, process_alive, wait_for

STUBBORN = """
import signal, subprocess, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
# Like a job: a grandchild in a session of its own, out of reach of our group.
subprocess.Popen(["sleep", "300"], start_new_session=True)
print("ready", flush=True)
time.sleep(300)
"""


def test_stop_kills_a_child_ignoring_sigterm_and_its_detached_grandchild() -> None:
    out = io.BytesIO()
    supervisor = Supervisor("test-marker-1", out=out, stop_timeout=1)
    child = supervisor.start("stub", [sys.executable, "-c", STUBBORN], cli_env())
    supervisor.stream()
    wait_for(lambda: b"stub   | ready\n" in out.getvalue(), 10, what="the child's output")
    wait_for(lambda: len(marked_processes("test-marker-1")) >= 2, 10,
             what="child and grandchild carrying the marker")
    pids = [p.pid for p in marked_processes("test-marker-1")]
    assert child.proc.pid in pids

    started = time.monotonic()
    supervisor.stop()
    assert time.monotonic() - started < 8
    assert wait_for(lambda: all_dead(pids), 5, what="every marked process to end")
    assert child.proc.returncode == -signal.SIGKILL


def test_watch_reports_a_child_that_exits_on_its_own() -> None:
    supervisor = Supervisor("test-marker-2", out=io.BytesIO())
    supervisor.start("quitter", [sys.executable, "-c", "raise SystemExit(3)"], cli_env())
    supervisor.stream()
    with pytest.raises(ChildDied, match="quitter exited with status 3"):
        supervisor.watch()
    supervisor.stop()


def test_up_exits_nonzero_when_its_worker_dies(tmp_path: Path) -> None:
    remote = GitRemote(tmp_path / "git")
    remote.commit({"appspec.yaml": appspec_yaml(command="true")})
    up = start_up(tmp_path, remote, tmp_path / "state")

    def worker() -> psutil.Process | None:
        for pid in family(up.proc.pid):
            try:
                if psutil.Process(pid).cmdline()[1:3] == ["-m", "worker"]:
                    return psutil.Process(pid)
            except (psutil.Error, IndexError):
                continue
        return None

    victim = wait_for(worker, 30, what="up's worker")
    pids = family(up.proc.pid)
    victim.kill()
    try:
        assert up.proc.wait(20) == 1
    finally:
        up.stop()
    assert "postdeploy: error: worker was killed by signal 9; stopping everything" in up.log()
    assert wait_for(lambda: all_dead(pids), 10, what="the rest of up to stop")
    assert not any(process_alive(p) for p in pids)
