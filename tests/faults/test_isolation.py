"""A hostile app author: one app's job, on a worker that several apps share.

Each test is an attack that worked before jobs ran under a guard, as the job user,
in a sandbox: reading the executor's secrets, planting git hooks, killing its own
worker again and again, escaping the timeout, a stalled worker's lease. The job user
tests need root (CI runs as root) and are skipped with a reason otherwise.
"""

from __future__ import annotations

import base64
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.faults.conftest import Executor, FaultScope
from tests.faults.harness import (
    GitHttpServer,
    audit,
    crash_host,
    journal_job,
    journal_lines,
    serve_dumb,
    worker_ready,
)
from tests.support.core import (
    GitRemote,
    appspec_yaml,
    output_of,
    process_alive,
    runs,
    wait_for,
)

ROOT = os.geteuid() == 0
REDIS_PASSWORD = "redis-pw-0b6f2a"
REPO_TOKEN = "repo-token-9d41ce"
OTHER_SECRET = "billing-secret-5e8a70"


def finished(client: object, app: str, sha: str) -> Callable[[], list[str]]:
    def statuses() -> list[str]:
        return [r.status for r in runs(client, app)  # type: ignore[arg-type]
                if r.sha == sha and r.status not in ("queued", "running", "waiting")]
    return statuses


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.mark.skipif(not ROOT, reason="jobs run as the job user only when the executor is root")
def test_job_cannot_reach_the_executor_or_other_apps(
        tmp_path: Path, executor: Callable[..., Executor], fault: FaultScope) -> None:
    shop, billing = GitRemote(tmp_path / "git", "shop"), GitRemote(tmp_path / "git", "billing")
    for remote in (shop, billing):
        serve_dumb(remote)
    http = GitHttpServer(tmp_path / "git", accept=("deploy", REPO_TOKEN)).start()
    # Everything the job can get at is printed base64-encoded, so that masking of the
    # output cannot hide a leak: the test looks for the encoded secrets.
    probe = ("for f in ../../redis.url ../../../postdeploy.yaml /proc/$PPID/environ "
             "/proc/$PPID/../$PPID/environ ../billing/appspec.yaml; do "
             "echo \"$f $(base64 -w0 < $f 2>/dev/null)\"; done; "
             "echo \"origin $(git config remote.origin.url | base64 -w0)\"; "
             "echo \"env $(env | base64 -w0)\"; "
             "ls -a ../.. ../ 2>&1 | base64 -w0; echo; id -u")
    sha = shop.commit({"appspec.yaml": appspec_yaml(probe)}, "probe")
    billing.commit({"appspec.yaml": appspec_yaml("true", secrets={"KEY": OTHER_SECRET})})
    config = tmp_path / "postdeploy.yaml"
    config.write_text(yaml.safe_dump({"apps": [
        {"name": "shop", "repo": http.url("shop.git", "deploy", REPO_TOKEN), "branch": "main"},
        {"name": "billing", "repo": http.url("billing.git", "deploy", REPO_TOKEN),
         "branch": "main"}]}))
    try:
        made = executor(password=REDIS_PASSWORD, POSTDEPLOY_CONFIG=str(config))
        client, worker = made.client, made.worker
        with fault("job reads the executor's secrets, its repo token, another app"):
            wait_for(lambda: "succeeded" in finished(client, "shop", sha)(), 60,
                     what="the probe job")
            wait_for(lambda: runs(client, "billing"), 60, what="billing's checkout")
            out = output_of(client, runs(client, "shop")[-1].id)
            assert out.splitlines()[-1] != "0"  # not root
            for secret in (REDIS_PASSWORD, REPO_TOKEN, OTHER_SECRET, "billing"):
                assert b64(secret)[:12] not in out, secret
            assert worker.alive()
    finally:
        http.stop()


def test_git_hooks_planted_by_a_job_never_run(
        tmp_path: Path, remote: GitRemote, executor: Callable[..., Executor],
        fault: FaultScope) -> None:
    marker = tmp_path / "hook-ran"
    hook = f"#!/bin/sh\ntouch {marker}\n"
    plant = (f"for h in post-checkout post-merge reference-transaction; do "
             f"printf '{hook}' > ../../.git/hooks/$h 2>/dev/null || "
             f"printf '{hook}' > .git/hooks/$h 2>/dev/null; "
             f"chmod +x .git/hooks/$h 2>/dev/null; done; "
             f"git config core.hooksPath /tmp 2>/dev/null; true")
    sha1 = remote.commit({"appspec.yaml": appspec_yaml(plant)}, "plant")
    client = executor().client
    with fault("job plants git hooks in its checkout") as f:
        wait_for(lambda: finished(client, "shop", sha1)(), 60, what="the planting job")
        sha2 = remote.commit({"appspec.yaml": appspec_yaml("true"), "x": "2"}, "two")
        sha3 = remote.commit({"appspec.yaml": appspec_yaml("true"), "x": "3"}, "three")
        wait_for(lambda: "succeeded" in finished(client, "shop", sha3)(), 60,
                 what="the next commits' checkouts")
        assert not marker.exists()
        f.audit = audit(client, "shop", [sha1, sha3])
        del sha2  # superseded or run: either way its checkout ran no hook


def test_repo_token_is_not_in_the_checkout(
        tmp_path: Path, remote: GitRemote, executor: Callable[..., Executor],
        fault: FaultScope) -> None:
    serve_dumb(remote)
    http = GitHttpServer(tmp_path / "git", accept=("deploy", REPO_TOKEN)).start()
    # What the job finds of its repo's address, base64-encoded so that masking of the
    # output cannot hide a leak.
    probe = ("echo \"origin $(git config remote.origin.url | base64 -w0)\"; "
             "echo \"files $(cat .git/config .git/FETCH_HEAD 2>/dev/null | base64 -w0)\"")
    first = remote.commit({"appspec.yaml": appspec_yaml(probe)}, "probe")
    try:
        made = executor(repo=http.url("shop.git", "deploy", REPO_TOKEN))
        with fault("repo token in the job's checkout") as f:
            wait_for(lambda: "succeeded" in finished(made.client, "shop", first)(), 60,
                     what="the probe job")
            out = output_of(made.client, runs(made.client, "shop")[-1].id)
            origin = out.split("origin ", 1)[1].split()[0]
            assert base64.b64decode(origin).decode().strip() == http.url("shop.git")
            assert b64(REPO_TOKEN)[:8] not in out and REPO_TOKEN not in out
            # New commits are still fetched, with the token the clone does not hold.
            second = remote.commit({"appspec.yaml": appspec_yaml(probe), "v": "2"}, "two")
            wait_for(lambda: "succeeded" in finished(made.client, "shop", second)(), 60,
                     what="the next commit's job")
            assert b64(REPO_TOKEN)[:8] not in output_of(
                made.client, runs(made.client, "shop")[-1].id)
            f.audit = audit(made.client, "shop", [first, second])
    finally:
        http.stop()


def test_job_killing_its_parent_does_not_loop(
        remote: GitRemote, executor: Callable[..., Executor], fault: FaultScope) -> None:
    sha = remote.commit({"appspec.yaml": appspec_yaml("kill -9 $PPID; sleep 3")}, "evil")
    made = executor()
    client, worker = made.client, made.worker
    with fault("job kills its parent (kill -9 $PPID)"):
        wait_for(lambda: finished(client, "shop", sha)(), 60, what="a finished run")
        time.sleep(15)  # long enough for several lock TTLs: no endless re-runs
        attempts = [r for r in runs(client, "shop") if r.sha == sha]
        assert len(attempts) <= 4, [r.status for r in attempts]
        assert attempts[-1].status not in ("queued", "running"), attempts[-1]
        assert worker.alive()


def test_timeout_stops_escaped_descendants(
        tmp_path: Path, remote: GitRemote, executor: Callable[..., Executor],
        fault: FaultScope) -> None:
    pids = tmp_path / "pids"
    pids.touch()
    pids.chmod(0o666)
    escape = (f"setsid env -i sleep 1000 & echo $! >> {pids}; "
              f"(setsid sh -c 'sleep 1000 & echo $! >> {pids}' &); "
              "sleep 1000")
    sha = remote.commit({"appspec.yaml": appspec_yaml(escape, timeout="2")}, "escape")
    client = executor().client
    with fault("timed-out job with setsid / env -i / double-fork children"):
        wait_for(lambda: "timed_out" in finished(client, "shop", sha)(), 60,
                 what="the job to time out")
        found = [int(p) for p in pids.read_text().split()]
        assert len(found) == 2
        for pid in found:
            wait_for(lambda pid=pid: not process_alive(pid), 5, what=f"{pid} stopped")


def test_daemon_of_a_succeeded_job_keeps_writing(
        tmp_path: Path, remote: GitRemote, executor: Callable[..., Executor],
        fault: FaultScope) -> None:
    pidfile = tmp_path / "daemon.pid"
    daemon = (f"(while true; do echo tick; sleep 0.2; done) & echo $! > {pidfile}; "
              "echo started")
    sha = remote.commit({"appspec.yaml": appspec_yaml(daemon)}, "daemon")
    client = executor().client
    with fault("daemon of a succeeded job writing to the job's stdout"):
        wait_for(lambda: "succeeded" in finished(client, "shop", sha)(), 60,
                 what="the job")
        pid = int(pidfile.read_text())
        try:
            time.sleep(3)  # fifteen more writes: SIGPIPE would have come at the first
            assert process_alive(pid)
        finally:
            os.kill(pid, signal.SIGKILL)


def test_stalled_worker_never_lets_a_second_copy_start(
        tmp_path: Path, remote: GitRemote, executor: Callable[..., Executor],
        fault: FaultScope) -> None:
    journal = tmp_path / "journal"
    sha = remote.commit({"appspec.yaml": appspec_yaml(journal_job(journal, "sleep 12"))},
                        "long")
    made = executor()
    client, worker_a = made.client, made.worker
    with fault("worker stalls (SIGSTOP) for longer than the lease mid-job") as f:
        wait_for(lambda: journal_lines(journal, "start"), 60, what="the job to start")
        os.killpg(worker_a.proc.pid, signal.SIGSTOP)
        worker_b = made.start("-b", beat=False,
                              POSTDEPLOY_STATE_DIR=str(tmp_path / "state-b"))
        wait_for(lambda: worker_ready(worker_b), 30, what="the second host")
        time.sleep(10)  # two lock TTLs: a second copy would start now
        os.killpg(worker_a.proc.pid, signal.SIGCONT)
        wait_for(lambda: finished(client, "shop", sha)(), 60, what="the run to finish")
        time.sleep(3)
        assert journal_lines(journal, "overlap") == []
        assert len(journal_lines(journal, "start")) == 1
        assert finished(client, "shop", sha)() == ["succeeded"]
        f.audit = audit(client, "shop", [sha])


def test_a_commit_whose_runs_keep_dying_is_tried_three_times(
        remote: GitRemote, executor: Callable[..., Executor], fault: FaultScope) -> None:
    sha = remote.commit({"appspec.yaml": appspec_yaml("echo started; sleep 60")}, "deadly")
    made = executor(start=False)
    client = made.client
    made.beats.append(made.services("beat", made.env, "beat"))
    seen: set[str] = set()
    with fault("a commit whose runs die with their worker, again and again"):
        for attempt in range(3):
            worker = made.start(f"-{attempt}", beat=False)

            def new_running() -> str | None:
                return next((r.id for r in runs(client, "shop") if r.sha == sha
                             and r.status == "running" and r.id not in seen
                             and "started" in output_of(client, r.id)), None)

            run_id = wait_for(new_running, 60, what=f"attempt {attempt + 1} to run")
            seen.add(run_id)
            crash_host(worker, [run_id])
        made.start("-last", beat=False)
        wait_for(lambda: any(r.sha == sha and r.status == "error" for r in runs(client, "shop")),
                 60, what="the fourth attempt to end as error")
        statuses = [r.status for r in runs(client, "shop") if r.sha == sha]
        assert statuses == ["lost", "lost", "lost", "error"], statuses
        error = runs(client, "shop")[-1]
        assert "died with their worker" in (error.reason or "")


def test_a_run_finishing_while_redis_is_full_is_recorded_once(
        tmp_path: Path, remote: GitRemote, executor: Callable[..., Executor],
        fault: FaultScope, report: Callable[[str], None]) -> None:
    journal = tmp_path / "journal"
    sha = remote.commit({"appspec.yaml": appspec_yaml(journal_job(journal, "sleep 2"))},
                        "full")
    made = executor()
    client = made.client
    with fault("Redis at maxmemory (noeviction) while a job finishes") as f:
        wait_for(lambda: journal_lines(journal, "start"), 60, what="the job to start")
        before = (len(made.worker.log().splitlines()), len(made.beat.log().splitlines()))
        used = int(client.info("memory")["used_memory"])
        client.config_set("maxmemory", str(used))  # every write that needs memory fails
        try:
            wait_for(lambda: journal_lines(journal, "end"), 30, what="the job to end")
            time.sleep(8)  # longer than the lock TTL (5 s): the lease must hold meanwhile
        finally:
            client.config_set("maxmemory", "0")
        wait_for(lambda: finished(client, "shop", sha)(), 60, what="the run to be recorded")
        time.sleep(4)  # a few more checks: the commit must not run again
        assert finished(client, "shop", sha)() == ["succeeded"]
        assert len(journal_lines(journal, "start")) == 1
        records = [line for log in (made.worker.log().splitlines()[before[0]:],
                                    made.beat.log().splitlines()[before[1]:])
                   for line in log if line.startswith("20")]
        report(f"Redis full for ~10 s: {len(records)} log records from worker and beat")
        assert len(records) < 60, records[-20:]
        f.audit = audit(client, "shop", [sha])
