"""Following any run from anywhere: `postdeploy logs APP --follow` (and `run --wait`).

The CLI runs outside the host whose worker runs the job (a simulated host in
its own PID namespace, tests/hosts.py), so what it prints can only come
through Redis, as it would from an operator's laptop.
"""

from __future__ import annotations

import select
import subprocess
import sys
from pathlib import Path

import redis

from tests.support.clirun import cli_env
from tests.support.core import GitRemote, appspec_yaml, output_of, runs, wait_for
from tests.support.hosts import Fleet

# Three parts with pauses between them: the follower starts during the first.
SLOW_JOB = "echo part-one; sleep 2; echo part-two; sleep 2; echo part-three"


def follow(state_dir: Path, redis_url: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "postdeploy.cli", "--state-dir",
                             str(state_dir), "logs", "shop", "--follow", *args],
                            env=cli_env(POSTDEPLOY_REDIS_URL=redis_url),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def running_run(client: redis.Redis) -> str:
    def started() -> str | None:
        found = [r for r in runs(client, "shop") if r.status == "running"]
        return found[0].id if found and "part-one" in output_of(client, found[0].id) else None
    return wait_for(started, 40, 0.1, what="the automatic run printing its first part")


def test_logs_follow_streams_an_automatic_run_on_another_host_and_exits_with_its_result(
        fleet: Fleet, remote: GitRemote, rclient: redis.Redis, tmp_path: Path) -> None:
    remote.commit({"appspec.yaml": appspec_yaml(SLOW_JOB + "; exit 3")}, "c1")
    fleet.add("host-a").start()
    run_id = running_run(rclient)

    follower = follow(tmp_path / "cli", fleet.redis_url)
    out, err = follower.communicate(timeout=60)
    assert follower.returncode == 1, err
    # Everything, including what the job printed after the follower started, once each.
    assert [line for line in out.splitlines() if line.startswith("part-")] == [
        "part-one", "part-two", "part-three"]
    assert f"run {run_id} on host-a failed" in err and "code 3" in err
    assert "Traceback" not in err


def test_logs_follow_of_a_given_run_exits_zero_when_it_succeeds_and_ctrl_c_leaves_it_running(
        fleet: Fleet, remote: GitRemote, rclient: redis.Redis, tmp_path: Path) -> None:
    remote.commit({"appspec.yaml": appspec_yaml(SLOW_JOB)}, "c1")
    fleet.add("host-a").start()
    run_id = running_run(rclient)

    interrupted = follow(tmp_path / "cli", fleet.redis_url, run_id)
    out = interrupted.stdout
    assert out is not None
    # Ctrl-C once it is following: it has printed the part already stored.
    wait_for(lambda: select.select([out], [], [], 0)[0], 30, what="the follower's output")
    assert out.readline().strip() == "part-one"
    interrupted.send_signal(2)  # Ctrl-C
    _, err = interrupted.communicate(timeout=30)
    assert interrupted.returncode == 130 and "stopped following" in err
    assert next(r for r in runs(rclient, "shop") if r.id == run_id).status == "running"

    follower = follow(tmp_path / "cli", fleet.redis_url, run_id)
    out, err = follower.communicate(timeout=60)
    assert follower.returncode == 0, err
    assert "part-three" in out and f"run {run_id} succeeded" in err
    # A finished run: the stored output, and the same verdict at once.
    again = follow(tmp_path / "cli", fleet.redis_url, run_id)
    out, _ = again.communicate(timeout=30)
    assert again.returncode == 0 and "part-one" in out
