"""The real CLI (subprocesses) against a real `postdeploy up` on its embedded Redis."""

from __future__ import annotations

import importlib.util
import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from postdeploy.config.settings import AppConfig
from postdeploy.store.records import RunRecord
from postdeploy.store.state import StateStore
from tests.support.clirun import (
    JOB_SCRIPT,
    all_dead,
    cli,
    cli_env,
    family,
    interrupt,
    marker_of,
    start_up,
    wait_succeeded,
)
from tests.support.core import (
    GitRemote,
    Service,
    appspec_yaml,
    free_port,
    process_alive,
    run_git,
    wait_for,
)


@dataclass
class Running:
    root: Path
    remote: GitRemote
    state_dir: Path
    sha: str
    up: Service


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """One `postdeploy up` shared by the read-mostly tests of this module."""
    root = tmp_path_factory.mktemp("cli")
    remote = GitRemote(root / "git")
    sha = remote.commit({"appspec.yaml": appspec_yaml(command="bash job.sh", folder="scripts"),
                         "scripts/job.sh": JOB_SCRIPT})
    state_dir = root / "state"
    up = start_up(root, remote, state_dir)
    try:
        wait_succeeded(state_dir)
        yield Running(root, remote, state_dir, sha, up)
    finally:
        interrupt(up)


def one_error_line(result: object) -> str:
    """The single `postdeploy: error:` line of a failed command (no traceback)."""
    assert result.returncode != 0, result  # type: ignore[attr-defined]
    stderr: str = result.stderr  # type: ignore[attr-defined]
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("postdeploy: error: "), lines[0]
    return lines[0]


def history_of(running: Running) -> list[dict[str, object]]:
    runs: list[dict[str, object]] = json.loads(
        cli(running.state_dir, "history", "shop", "--json").stdout)["runs"]
    return runs


def test_first_job_runs_and_status_json_shows_it_succeeded(running: Running) -> None:
    data = json.loads(cli(running.state_dir, "status", "--json").stdout)
    (row,) = data["apps"]
    assert row["app"] == "shop"
    assert row["last_seen_sha"] == running.sha
    runs = history_of(running)
    assert row["latest_run"] == runs[0]  # whatever other tests ran meanwhile
    auto = [r for r in runs if r["trigger"] == "auto"]
    assert len(auto) == 1, auto
    run = auto[0]
    assert run["status"] == "succeeded" and run["sha"] == running.sha and run["exit_code"] == 0
    assert isinstance(run["duration"], float)
    # The job's lines reach the operator's terminal, prefixed once.
    line = f"[POST-DEPLOY] shop@{running.sha[:7]} | hello from auto run"
    wait_for(lambda: line in running.up.log(), 10,
             what="job output in up's output")
    assert "postdeploy up: watching 1 app(s)" in running.up.log()
    assert "redis://***@127.0.0.1:" in running.up.log()


def test_status_table_is_readable(running: Running) -> None:
    result = cli(running.state_dir, "status")
    assert result.returncode == 0, result.stderr
    header, row = result.stdout.strip().splitlines()[:2]
    assert header.split()[:3] == ["APP", "COMMIT", "LATEST"]
    assert row.split()[:2] == ["shop", running.sha[:7]]
    assert str(history_of(running)[0]["status"]) in row


def test_run_wait_follows_a_manual_run_and_exits_zero(running: Running) -> None:
    result = cli(running.state_dir, "run", "shop", "--wait")
    assert result.returncode == 0, result.stderr
    assert "[POST-DEPLOY] hello from manual run" in result.stdout
    assert "succeeded" in result.stderr


def test_logs_and_history_show_auto_and_manual_runs(running: Running) -> None:
    assert cli(running.state_dir, "run", "shop", "--wait").returncode == 0
    history = json.loads(cli(running.state_dir, "history", "shop", "--json").stdout)
    assert history["app"] == "shop"
    triggers = [r["trigger"] for r in history["runs"]]
    assert triggers[0] == "manual" and "auto" in triggers
    auto = next(r for r in history["runs"] if r["trigger"] == "auto")

    latest = cli(running.state_dir, "logs", "shop")
    assert latest.returncode == 0, latest.stderr
    assert "hello from manual run" in latest.stdout
    first = cli(running.state_dir, "logs", "shop", auto["id"])
    assert "hello from auto run" in first.stdout
    limited = json.loads(cli(running.state_dir, "history", "shop", "--json", "--limit", "1")
                         .stdout)
    assert len(limited["runs"]) == 1
    table = cli(running.state_dir, "history", "shop").stdout
    assert "manual" in table and "auto" in table


def test_run_with_an_explicit_sha_and_a_prefix(running: Running) -> None:
    result = cli(running.state_dir, "run", "shop", "--sha", running.sha[:10])
    assert result.returncode == 0, result.stderr
    assert f"shop@{running.sha[:7]}" in result.stdout


def test_check_reports_an_unchanged_commit(running: Running) -> None:
    result = cli(running.state_dir, "check", "shop")
    assert result.returncode == 0, result.stderr
    assert f"shop: unchanged at {running.sha[:7]}" in result.stdout


@pytest.mark.parametrize("args, expected", [
    (["run", "nope"], "unknown app 'nope'"),
    (["logs", "nope"], "unknown app 'nope'"),
    (["run", "shop", "--sha", "not-a-sha"], "invalid --sha"),
    (["run", "shop", "--sha", "0" * 40], "is not in"),
    (["logs", "shop", "0123456789abcdef"], "no run '0123456789abcdef'"),
    (["history", "shop", "--limit", "0"], "--limit"),
    (["frobnicate"], "No such command"),
    (["--redis-url", "redis://127.0.0.1:1/0", "status"], "cannot reach Redis"),
    (["--redis-url", "http://nope", "status"], "invalid POSTDEPLOY_REDIS_URL"),
])
def test_errors_are_one_clear_line(running: Running, args: list[str], expected: str) -> None:
    line = one_error_line(cli(running.state_dir, *args))
    assert expected in line


def test_no_running_up_is_one_clear_line(tmp_path: Path) -> None:
    line = one_error_line(cli(tmp_path / "state", "status"))
    assert "no running `postdeploy up` found" in line


def test_up_needs_apps_and_a_free_state_dir(running: Running, tmp_path: Path) -> None:
    line = one_error_line(cli(tmp_path / "state", "up", cwd=tmp_path))
    assert "no apps to watch" in line
    line = one_error_line(cli(tmp_path / "state", "up", "--repo", running.remote.url,
                              "--interval", "-1", cwd=tmp_path))
    assert "--interval" in line
    line = one_error_line(cli(running.state_dir, "up", "--repo", running.remote.url))
    assert "already running" in line


def test_a_failing_manual_run_exits_nonzero_with_its_reason(running: Running) -> None:
    # On a branch of its own: the watched branch, and so every other test, is untouched.
    work = running.remote.work
    run_git(work, "checkout", "-q", "-b", "failing")
    try:
        (work / "scripts" / "job.sh").write_text('echo "[POST-DEPLOY] oops"; exit 3\n')
        run_git(work, "commit", "-q", "-am", "a failing job")
        run_git(work, "push", "-q", "origin", "failing")
        sha = run_git(work, "rev-parse", "HEAD").strip()
    finally:
        run_git(work, "checkout", "-q", running.remote.branch)
    result = cli(running.state_dir, "run", "shop", "--sha", sha, "--wait")
    assert result.returncode != 0
    assert "[POST-DEPLOY] oops" in result.stdout
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("postdeploy: error: run ") and "failed: exited with code 3" in last
    assert last.count("code 3") == 1, last  # said once


# -- job output on a terminal ---------------------------------------------------

CONTROL_OUTPUT = b"x\r2026-01-01 INFO [POST-DEPLOY] billing@1234567 | FORGED\n\x1b[2J\x07\x00ok\r\n"


def on_a_terminal(args: list[str], env: dict[str, str], cwd: Path) -> tuple[int, bytes]:
    """Run the CLI with its stdout on a pseudo-terminal; its exit code and what it showed."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "postdeploy.cli", *args], cwd=cwd, env=env,
                            stdin=subprocess.DEVNULL, stdout=follower,
                            stderr=subprocess.DEVNULL)
    os.close(follower)
    shown = b""
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            if not select.select([leader], [], [], 0.5)[0]:
                continue
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: the program closed the terminal
                break
            if not data:
                break
            shown += data
    finally:
        os.close(leader)
    # The terminal itself turns "\n" into "\r\n" on output.
    return proc.wait(timeout=30), shown.replace(b"\r\n", b"\n")


def test_logs_escapes_control_characters_on_a_terminal_unless_raw(
        tmp_path: Path, redis_url: str) -> None:
    store = StateStore(redis.Redis.from_url(redis_url))
    store.register_apps([AppConfig(name="shop", repo="https://git.example.com/shop.git")])
    record = RunRecord.new("shop", "a" * 40, "auto")
    record.status = "succeeded"
    store.add_run(record)
    store.write_output(record.id, CONTROL_OUTPUT, len(CONTROL_OUTPUT))
    env = cli_env(POSTDEPLOY_REDIS_URL=redis_url)
    args = ["--state-dir", str(tmp_path / "state"), "logs", "shop"]

    code, shown = on_a_terminal(args, env, tmp_path)
    assert code == 0
    assert shown == (b"x\\r2026-01-01 INFO [POST-DEPLOY] billing@1234567 | FORGED\n"
                     b"\\x1b[2J\\x07\\x00ok\n")

    code, shown = on_a_terminal([*args, "--raw"], env, tmp_path)
    assert code == 0 and b"\x1b[2J\x07\x00ok" in shown

    piped = subprocess.run([sys.executable, "-m", "postdeploy.cli", *args], cwd=tmp_path,
                           env=env, capture_output=True, timeout=60)
    assert piped.returncode == 0 and piped.stdout == CONTROL_OUTPUT


# -- stopping and restarting `up` ------------------------------------------------

def test_sigint_stops_everything_and_a_restart_runs_nothing(tmp_path: Path) -> None:
    remote = GitRemote(tmp_path / "git")
    daemon_pid = tmp_path / "daemon.pid"
    # Like the guide's `pm2 start`: the job leaves a daemon behind and exits 0.
    remote.commit({"appspec.yaml": appspec_yaml(command="bash job.sh"),
                   "job.sh": JOB_SCRIPT + 'nohup sleep 300 >/dev/null 2>&1 &\n'
                                          'echo $! > "$DAEMON_PID_FILE"\n'})
    state_dir = tmp_path / "state"
    up = start_up(tmp_path, remote, state_dir, DAEMON_PID_FILE=str(daemon_pid))
    first = wait_succeeded(state_dir)
    pids = family(up.proc.pid) + [int(daemon_pid.read_text())]
    marker = marker_of(pids)
    assert marker and len(pids) >= 5  # up, redis, worker (+ pool), beat, the daemon

    daemon = pids.pop()
    assert interrupt(up) == 0
    assert wait_for(lambda: all_dead(pids), 10, what="every process of `up` to end")
    # The daemon a succeeded job started is the app's: it outlives `up`.
    assert process_alive(daemon)
    os.kill(daemon, signal.SIGKILL)
    assert not (state_dir / "redis.url").exists()
    assert "postdeploy up: stopped" in up.log()

    again = start_up(tmp_path, remote, state_dir, name="up-again",
                     DAEMON_PID_FILE=str(daemon_pid))
    try:
        check = wait_for(lambda: cli(state_dir, "check", "shop", "--timeout", "5").stdout,
                         60, 0.5, what="an answer to `check shop` after the restart")
        assert "unchanged" in check
        # A positive control: beat's checks do notice a new commit. Every enqueued run is
        # recorded at once, so two runs in all means the restart queued nothing.
        new_sha = remote.commit({"README": "v2\n"})
        latest = wait_succeeded(state_dir, count=2)
        assert latest["sha"] == new_sha
        history = json.loads(cli(state_dir, "history", "shop", "--json").stdout)
        assert [(r["trigger"], r["sha"]) for r in history["runs"]] == [
            ("auto", new_sha), ("auto", first["sha"])]
    finally:
        interrupt(again)


@pytest.mark.skipif(importlib.util.find_spec("postdeploy.services.flower") is None,
                    reason="postdeploy.services.flower is not there yet")
def test_up_with_flower_serves_it_and_stops_it(tmp_path: Path) -> None:
    remote = GitRemote(tmp_path / "git")
    remote.commit({"appspec.yaml": appspec_yaml(command="true")})
    port = free_port()
    state_dir = tmp_path / "state"
    up = Service(["-m", "postdeploy.cli", "up", "--repo", remote.url, "--interval", "1",
                  "--state-dir", str(state_dir), "--flower", "--flower-port", str(port)],
                 cli_env(FLOWER_BASIC_AUTH="ops:secret"), tmp_path / "up.log", cwd=tmp_path)
    try:
        def answers() -> int | None:
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).status
            except urllib.error.HTTPError as exc:
                return exc.code  # 401: Flower is there and asks for the password
            except OSError:
                return None
        assert wait_for(answers, 60, 0.5, what="Flower to answer") == 401
        assert f"flower  http://127.0.0.1:{port}/" in up.log()
        pids = family(up.proc.pid)
        assert interrupt(up) == 0
        assert wait_for(lambda: all_dead(pids), 10, what="Flower and the rest to stop")
        assert "secret" not in up.log()
    finally:
        up.stop()


def test_status_shows_a_failing_commit_check(tmp_path: Path, redis_url: str) -> None:
    """Against a worker's Redis (no `up`): the error is in the table and in --json."""
    store = StateStore(redis.Redis.from_url(redis_url))
    store.register_apps([AppConfig(name="shop", repo="https://git.example.com/shop.git")])
    store.check_failed("shop", "git ls-remote failed for https://***@git.example.com/shop.git: "
                       "fatal: Authentication failed", 600)
    env = cli_env(POSTDEPLOY_REDIS_URL=redis_url)
    table = cli(tmp_path / "state", "status", env=env)
    assert table.returncode == 0, table.stderr
    assert "shop: commit check failing: git ls-remote failed" in table.stdout
    data = json.loads(cli(tmp_path / "state", "status", "--json", env=env).stdout)
    assert "Authentication failed" in data["apps"][0]["check_error"]


def test_version(tmp_path: Path) -> None:
    result = cli(tmp_path, "--version")
    assert result.returncode == 0 and result.stdout.startswith("postdeploy, version ")


@pytest.mark.parametrize("args", [
    ["--redis-url", "redis://:s3cret-pw@127.0.0.1:6379/0", "worker"],
    ["status", "--redis-url", "redis://user:s3cret-pw@127.0.0.1:6379/0"],
    ["up", "--repo", ".", "--redis-url", "redis://:s3cret-pw@127.0.0.1:6379/0"],
    ["--redis-url", "redis://127.0.0.1:6379/0?password=s3cret-pw", "beat"],
])
def test_a_password_on_the_command_line_is_refused(tmp_path: Path, args: list[str]) -> None:
    result = cli(tmp_path / "state", *args, cwd=tmp_path, timeout=30)
    assert result.returncode == 2
    line = one_error_line(result)
    assert "POSTDEPLOY_REDIS_URL" in line and "--redis-url-file" in line
    assert "s3cret-pw" not in result.stderr + result.stdout


def test_the_redis_url_comes_from_a_file(tmp_path: Path, redis_url: str) -> None:
    url_file = tmp_path / "redis.url"
    url_file.write_text(redis_url + "\n")
    url_file.chmod(0o600)
    result = cli(tmp_path / "state", "--redis-url-file", str(url_file), "status", cwd=tmp_path,
                 timeout=30)
    assert result.returncode == 0, result.stderr
    line = one_error_line(cli(tmp_path / "state", "status", "--redis-url-file",
                              str(tmp_path / "missing"), cwd=tmp_path, timeout=30))
    assert "--redis-url-file" in line and "cannot read it" in line
