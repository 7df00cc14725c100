"""Git remote trouble, all apps on one worker and beat: an unreachable host, a
401 for a URL with credentials, a deleted branch, a force-push, a large repository.
Each gives a WARNING (credentials hidden) and no run, and recovers once fixed.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

import redis
import yaml

from postdeploy.config.settings import AppConfig
from postdeploy.source.git import AppSource
from postdeploy.store.state import StateStore
from tests.faults.conftest import Executor, FaultScope
from tests.faults.harness import GitHttpServer, audit, serve_dumb
from tests.support.core import (
    GitRemote,
    Service,
    appspec_yaml,
    run_git,
    runs,
    wait_for,
)

INTERVAL = 1.0
JOB = appspec_yaml("echo ran $POST_DEPLOY_APP at $COMMIT_SHA")
NET_TOKEN = "tok-net-5f1c9a"
AUTH_TOKEN = "tok-auth-9b27e4"


def statuses(client: redis.Redis, app: str) -> list[tuple[str, str]]:
    return [(r.sha, r.status) for r in runs(client, app)]


def wait_ran(client: redis.Redis, app: str, sha: str, timeout: float = 60) -> None:
    wait_for(lambda: (sha, "succeeded") in statuses(client, app), timeout,
             what=f"{app}'s job for {sha[:7]}")


def wait_checks(client: redis.Redis, app: str, count: int) -> None:
    store = StateStore(client)
    for _ in range(count):
        before = store.checked_at(app) or 0.0
        wait_for(lambda b=before: (store.checked_at(app) or 0.0) > b,  # type: ignore[misc]
                 30, what=f"a successful check of {app}")


def warnings_for(worker: Service, app: str) -> list[str]:
    return [line for line in worker.log().splitlines()
            if "WARNING" in line and f"commit check of {app} failed" in line]


def git_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_git_remote_trouble(tmp_path: Path, executor: Callable[..., Executor],
                            fault: FaultScope, report: Callable[[str], None]) -> None:
    root = tmp_path / "git"
    remotes = {name: GitRemote(root, name) for name in ("net", "auth", "gone", "force", "big")}
    for name in ("net", "auth"):
        serve_dumb(remotes[name])
    shas = {name: remote.commit({"appspec.yaml": JOB}) for name, remote in remotes.items()
            if name != "big"}
    big_files: dict[str, str | bytes] = {f"data/{i:04d}.txt": f"file {i}\n" * 50
                                         for i in range(2000)}
    big_files["blob.bin"] = random.Random(4).randbytes(40 * 2**20)  # incompressible
    big_files["appspec.yaml"] = JOB
    shas["big"] = remotes["big"].commit(big_files)

    net_server = GitHttpServer(root)  # not started: the host is unreachable
    auth_server = GitHttpServer(root, accept=("deploy", "rotated")).start()  # 401 for us
    apps = [
        {"name": "net", "repo": net_server.url("net.git", "deploy", NET_TOKEN),
         "branch": "main"},
        {"name": "auth", "repo": auth_server.url("auth.git", "deploy", AUTH_TOKEN),
         "branch": "main"},
        *({"name": n, "repo": str(remotes[n].bare), "branch": "main"}
          for n in ("gone", "force", "big")),
    ]
    config = tmp_path / "postdeploy.yaml"
    config.write_text(yaml.safe_dump({"apps": apps}))
    stack = executor(interval=INTERVAL, POSTDEPLOY_CONFIG=str(config))
    client, worker, beat = stack.client, stack.worker, stack.beat
    try:
        for name in ("gone", "force", "big"):
            wait_ran(client, name, shas[name], 90)

        with fault("git host unreachable") as f:
            lines = wait_for(lambda: warnings_for(worker, "net")[:2], 30,
                             what="a WARNING about the unreachable host")
            assert all(NET_TOKEN not in line and "http://***@127.0.0.1" in line
                       for line in lines), lines
            assert runs(client, "net") == []
            net_server.start()
            wait_ran(client, "net", shas["net"])
            f.audit = audit(client, "net", [shas["net"]])

        with fault("git authentication failure (401)") as f:
            lines = wait_for(lambda: warnings_for(worker, "auth")[:2], 30,
                             what="a WARNING about the refused credentials")
            assert all(AUTH_TOKEN not in line for line in lines), lines
            assert any("Authentication failed" in line or "401" in line for line in lines)
            assert runs(client, "auth") == []
            auth_server.accept = ("deploy", AUTH_TOKEN)
            wait_ran(client, "auth", shas["auth"])
            f.audit = audit(client, "auth", [shas["auth"]])

        with fault("branch deleted") as f:
            run_git(remotes["gone"].bare, "update-ref", "-d", "refs/heads/main")
            wait_for(lambda: any("branch 'main' not found" in line
                                 for line in warnings_for(worker, "gone")), 30,
                     what="a WARNING about the missing branch")
            run_git(remotes["gone"].bare, "update-ref", "refs/heads/main", shas["gone"])
            wait_checks(client, "gone", 3)
            assert statuses(client, "gone") == [(shas["gone"], "succeeded")]  # ran already
            later = remotes["gone"].commit({"appspec.yaml": JOB, "n": "2"})
            wait_ran(client, "gone", later)
            f.audit = audit(client, "gone", [shas["gone"], later])

        with fault("history force-pushed") as f:
            work = remotes["force"].work
            run_git(work, "checkout", "-q", "--orphan", "rewritten")
            rewritten = remotes["force"].commit({"appspec.yaml": JOB, "new": "history"},
                                                "rewritten history")
            wait_ran(client, "force", rewritten)
            # Force-pushing back to a commit that already ran is a deployment (a
            # rollback): it runs once more, then nothing while it stays.
            run_git(work, "push", "-q", "--force", "origin", f"{shas['force']}:main")
            wait_for(lambda: statuses(client, "force")[2:] == [(shas["force"], "succeeded")],
                     60, what="the rollback's run")
            wait_checks(client, "force", 3)
            assert statuses(client, "force") == [(shas["force"], "succeeded"),
                                                 (rewritten, "succeeded"),
                                                 (shas["force"], "succeeded")]
            f.audit = audit(client, "force", [shas["force"], rewritten])

        with fault("large repository (2000 files, 40 MiB)") as f:
            clone_git = tmp_path / "state" / "checkouts" / "big" / ".git"
            size = git_size(clone_git)
            wait_checks(client, "big", 3)
            assert size > 40 * 2**20
            assert git_size(clone_git) == size  # checks fetched nothing
            fresh = AppSource(AppConfig("big", repo=str(remotes["big"].bare), branch="main"),
                              tmp_path / "fresh-state")
            started = time.monotonic()
            assert fresh.current_sha() == shas["big"]
            took = time.monotonic() - started
            assert not (tmp_path / "fresh-state" / "checkouts").exists()  # no clone
            report(f"large repository: a commit check took {took * 1000:.0f} ms "
                   f"and cloned nothing (the worker's clone: {size / 2**20:.1f} MiB)")
            assert took < 2.0
            f.audit = audit(client, "big", [shas["big"]])
        assert worker.alive() and beat.alive()
    finally:
        net_server.stop()
        auth_server.stop()
