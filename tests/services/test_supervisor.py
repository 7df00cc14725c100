"""The supervisor of `postdeploy up`: real child processes, real signals."""

from __future__ import annotations

import io
import os
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from postdeploy.services.supervisor import ChildDied, Supervisor, marked_processes
from tests.support.clirun import all_dead, cli_env, family, interrupt, start_up
from tests.support.core import GitRemote, Service, appspec_yaml, process_alive, wait_for

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


DAEMON_JOB = ('nohup sleep 300 >/dev/null 2>&1 &\n'
              'echo $! > "$PIDS/$POST_DEPLOY_APP.daemon"\n')


def test_stopping_up_leaves_a_succeeded_jobs_daemons_and_stops_a_running_job(
        tmp_path: Path) -> None:
    """The guide's `pm2 start`: what a succeeded job started belongs to the app."""
    pids = tmp_path / "pids"
    pids.mkdir()
    pids.chmod(0o1777)  # jobs may run as the unprivileged job user
    done, busy = GitRemote(tmp_path / "git", "done"), GitRemote(tmp_path / "git", "busy")
    done.commit({"appspec.yaml": appspec_yaml("bash job.sh"), "job.sh": DAEMON_JOB})
    busy.commit({"appspec.yaml": appspec_yaml("bash job.sh"),
                 "job.sh": DAEMON_JOB + 'echo $$ > "$PIDS/busy.job"\nsleep 300\n'})
    config = tmp_path / "postdeploy.yaml"
    config.write_text(yaml.safe_dump({"apps": [{"name": "done", "repo": done.url},
                                               {"name": "busy", "repo": busy.url}]}))
    up = Service(["-m", "postdeploy.cli", "up", "--config", str(config), "--interval", "1",
                  "--state-dir", str(tmp_path / "state")], cli_env(PIDS=str(pids)),
                 tmp_path / "up.log", cwd=tmp_path)
    try:
        files = [pids / "done.daemon", pids / "busy.daemon", pids / "busy.job"]
        wait_for(lambda: all(f.exists() and f.read_text().strip() for f in files), 60,
                 what="both jobs to start their daemons")
        kept, stopped, job = (int(f.read_text()) for f in files)
        wait_for(lambda: "done@" in up.log() and "succeeded" in up.log(), 30,
                 what="the first job to succeed")
        family_pids = family(up.proc.pid)
        assert interrupt(up) == 0
        assert wait_for(lambda: all_dead([*family_pids, stopped, job]), 15,
                        what="up and the running job's processes to end")
        assert process_alive(kept)
    finally:
        up.stop()
        for f in (pids / "done.daemon",):
            if f.exists() and process_alive(int(f.read_text())):
                os.kill(int(f.read_text()), signal.SIGKILL)
