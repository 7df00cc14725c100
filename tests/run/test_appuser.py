"""The app's user: who each app's job runs as (postdeploy/appuser.py, dynamic_uids.py).

Real workers as root, real passwd users (``app_users``), real git working copies;
one app's job attacks another's running job.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
import yaml

from tests.support.core import (
    GitRemote,
    Service,
    appspec_yaml,
    finished_runs,
    output_of,
    run_git,
    service_env,
    wait_for,
)

ROOT = os.geteuid() == 0


def write_config(path: Path, apps: list[dict[str, str]]) -> Path:
    path.write_text(yaml.safe_dump({"apps": apps}))
    return path


def postdeploy(*args: str, env: dict[str, str] | None = None,
               cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("POSTDEPLOY_")}
    return subprocess.run([sys.executable, "-m", "postdeploy.cli", *args],
                          env={**base, **(env or {})}, cwd=cwd, capture_output=True,
                          text=True, timeout=90)


def succeeded_output(client: redis.Redis, app: str, timeout: float = 90) -> str:
    def done() -> str | None:
        for run in finished_runs(client, app):
            assert run.status == "succeeded", (run.status, run.reason,
                                               output_of(client, run.id))
            return output_of(client, run.id)
        return None
    found: str = wait_for(done, timeout, 0.2, what=f"a finished run of {app}")
    return found


@pytest.mark.parametrize(("user", "expected"), [
    ("pdtest-nobody-here", "no user 'pdtest-nobody-here' on this host; create it"),
    ("root", "'root' is root; jobs must run as an unprivileged user"),
    ("0:0", "'0:0' is root"),
    ("4294967295:1", "out of range; uid and gid must be 1 to 4294967294"),
    ("shop:x", "is not a user name or uid:gid"),
    (1001, "is not a user name or a quoted uid:gid"),  # YAML's reading of 1001:1001
])
def test_a_bad_user_is_one_line_and_exit_2(tmp_path: Path, user: object,
                                           expected: str) -> None:
    config = tmp_path / "postdeploy.yaml"
    config.write_text(yaml.safe_dump({"apps": [{"name": "shop", "path": str(tmp_path),
                                                "user": user}]}))
    result = postdeploy("--config", str(config), "validate", str(tmp_path))
    assert result.returncode == 2, result
    assert "app 'shop': user: " in result.stderr and expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


@pytest.mark.parametrize("value", ["5-1", "0-10", "abc", "61184-99999999999"])
def test_a_bad_uid_range_is_one_line_and_exit_2(tmp_path: Path, value: str) -> None:
    result = postdeploy("--state-dir", str(tmp_path), "status",
                        env={"POSTDEPLOY_JOB_UIDS": value})
    assert result.returncode == 2
    assert result.stderr.startswith(f"postdeploy: error: invalid POSTDEPLOY_JOB_UIDS: "
                                     f"{value!r}")
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_worker_with_an_unknown_user_stops_in_one_line(tmp_path: Path, redis_url: str,
                                                         remote: GitRemote) -> None:
    config = write_config(tmp_path / "postdeploy.yaml",
                          [{"name": "shop", "repo": remote.url, "user": "pdtest-none"}])
    env = service_env(redis_url, tmp_path / "state", POSTDEPLOY_CONFIG=str(config))
    done = subprocess.run([sys.executable, "-m", "worker"], env=env, capture_output=True,
                          text=True, timeout=90)
    assert done.returncode == 2
    assert "app 'shop': user: no user 'pdtest-none' on this host" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.fixture
def worker(tmp_path: Path, redis_url: str,
           services: Callable[..., Service]) -> Callable[..., Service]:
    def start(config: Path, **extra: str) -> Service:
        env = service_env(redis_url, tmp_path / "state", POSTDEPLOY_CONFIG=str(config),
                          **extra)
        services("beat", env)
        return services("worker", env)
    return start


@pytest.mark.skipif(not ROOT, reason="switching users needs root")
def test_a_user_app_runs_as_that_user_with_its_home_and_git_works(
        tmp_path: Path, app_users: tuple[str, ...], rclient: redis.Redis,
        worker: Callable[..., Service]) -> None:
    remote = GitRemote(tmp_path / "git", "shop")
    sha = remote.commit({"appspec.yaml": appspec_yaml(
        "id -un; id -u; echo \"home=$HOME user=$USER logname=$LOGNAME\"; "
        "git rev-parse HEAD; git log -1 --pretty=%B")}, "ship it")
    config = write_config(tmp_path / "postdeploy.yaml",
                          [{"name": "shop", "repo": remote.url, "user": "pdtest-shop"}])
    worker(config)
    entry = pwd.getpwnam("pdtest-shop")
    lines = succeeded_output(rclient, "shop").splitlines()
    assert lines[:5] == ["pdtest-shop", str(entry.pw_uid),
                         f"home={entry.pw_dir} user=pdtest-shop logname=pdtest-shop",
                         sha, "ship it"]


@pytest.mark.skipif(not ROOT, reason="switching users needs root")
def test_apps_without_a_user_get_uids_of_their_own_and_cannot_touch_each_other(
        tmp_path: Path, rclient: redis.Redis, worker: Callable[..., Service]) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    victim, attacker = GitRemote(tmp_path / "git", "victim"), GitRemote(tmp_path / "git",
                                                                          "attacker")
    # The victim waits (bounded) for the attacker to have tried, then ends well.
    victim.commit({"appspec.yaml": appspec_yaml(
        f"id -u; echo $$ > {shared}/victim.pid; "
        f"for i in $(seq 600); do test -e {shared}/tried && exit 0; sleep 0.1; done; exit 3",
        secrets={"VICTIM_KEY": "victim-secret-81f3a2"})})
    attacker.commit({"appspec.yaml": appspec_yaml(
        f"id -u; for i in $(seq 600); do test -s {shared}/victim.pid && break; sleep 0.1; "
        f"done; pid=$(cat {shared}/victim.pid); "
        "cat /proc/$pid/environ > /dev/null 2>&1 && echo environ:read || echo environ:denied; "
        "kill -9 $pid 2>/dev/null && echo kill:done || echo kill:denied; "
        f"touch {shared}/tried")})
    config = write_config(tmp_path / "postdeploy.yaml", [
        {"name": "victim", "repo": victim.url}, {"name": "attacker", "repo": attacker.url}])
    worker(config)
    attacked = succeeded_output(rclient, "attacker").splitlines()
    survived = succeeded_output(rclient, "victim").splitlines()
    assert attacked[1:] == ["environ:denied", "kill:denied"]
    victim_uid, attacker_uid = int(survived[0]), int(attacked[0])
    assert victim_uid != attacker_uid
    assert all(61184 <= uid <= 65519 for uid in (victim_uid, attacker_uid))
    # Each app's home is its own and private.
    for app, uid in (("victim", victim_uid), ("attacker", attacker_uid)):
        info = (tmp_path / "state" / "homes" / app).stat()
        assert (info.st_uid, info.st_mode & 0o777) == (uid, 0o700)
    # validate says the same, and why.
    result = postdeploy("--config", str(config), "--state-dir", str(tmp_path / "state"),
                        "validate", str(victim.work), "--app", "victim")
    assert (f"ok: job of app victim runs as uid {victim_uid} (gid {victim_uid}): dynamic "
            f"uid {victim_uid} for app victim") in result.stdout


@pytest.mark.skipif(not ROOT, reason="switching users needs root")
def test_a_path_app_owned_by_its_user_runs_as_the_owner_and_git_works(
        tmp_path: Path, app_users: tuple[str, ...], rclient: redis.Redis,
        worker: Callable[..., Service]) -> None:
    work = tmp_path / "srv" / "blog"
    work.mkdir(parents=True)
    (tmp_path / "srv").chmod(0o755)
    (work / "appspec.yaml").write_text(appspec_yaml(
        "id -un; echo \"home=$HOME\"; git rev-parse HEAD; git log -1 --pretty=%B"))
    run_git(work, "init", "-q", "-b", "main")
    run_git(work, "add", "-A")
    run_git(work, "commit", "-q", "-m", "blog post")
    sha = run_git(work, "rev-parse", "HEAD").strip()
    shutil.chown(work, "pdtest-blog", "pdtest-blog")
    subprocess.run(["chown", "-R", "pdtest-blog:pdtest-blog", str(work)], check=True)
    config = write_config(tmp_path / "postdeploy.yaml", [{"name": "blog", "path": str(work)}])
    result = postdeploy("--config", str(config), "validate", str(work))
    entry = pwd.getpwnam("pdtest-blog")
    assert (f"ok: job of app blog runs as pdtest-blog (uid {entry.pw_uid}, gid "
            f"{entry.pw_gid}): owner of {work}") in result.stdout
    worker(config)
    # The executor (root) read HEAD and appspec.yaml in a working copy it does not own,
    # and the job's own git works there too; the operator's git config is untouched.
    lines = succeeded_output(rclient, "blog").splitlines()
    assert lines[:4] == ["pdtest-blog", f"home={entry.pw_dir}", sha, "blog post"]
    assert "safe.directory" not in subprocess.run(
        ["git", "config", "--global", "--list"], capture_output=True, text=True).stdout
