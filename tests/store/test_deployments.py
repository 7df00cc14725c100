"""Deployments, not commits: a rollback and a roll-forward each run the job once.

Real parts: redis-server, prefork workers and beats, git, the CLI; for ``path``
apps, simulated hosts each in its own PID namespace (tests/hosts.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import redis

from postdeploy.store.instances import Instance, InstanceRegistry
from postdeploy.store.records import RunRecord
from postdeploy.store.state import StateStore
from tests.support.clirun import cli, cli_env
from tests.support.core import GitRemote, Service, appspec_yaml, run_git, runs, wait_for
from tests.support.hosts import Fleet, Host

Start = Callable[..., Service]
EnvFor = Callable[..., dict[str, str]]


def shared_dir(tmp_path: Path) -> Path:
    """Where jobs (run as the unprivileged job user under root) may write."""
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o777)
    return out


def env_job(out: Path, wait_for_file: str | None = None) -> str:
    """A job that appends its commit and $POST_DEPLOY_PREVIOUS_SHA to out/env.log."""
    line = f'echo "$COMMIT_SHA prev=[${{POST_DEPLOY_PREVIOUS_SHA-unset}}]" >> {out}/env.log'
    if wait_for_file is None:
        return line
    # Bounded: holds the app's run lock until the test lets it go (at most 60 s).
    return (f"for i in $(seq 600); do [ -e {out}/{wait_for_file} ] && break; sleep 0.1; "
            f"done; {line}")


def finished(client: redis.Redis, count: int, timeout: float = 60) -> list[RunRecord]:
    def enough() -> list[RunRecord] | None:
        done = [r for r in runs(client, "shop")
                if r.status not in ("queued", "running", "waiting")]
        return done if len(done) >= count else None
    return wait_for(enough, timeout, 0.2, what=f"{count} finished run(s)")


def wait_checks(client: redis.Redis, count: int) -> None:
    store = StateStore(client)
    for _ in range(count):
        before = store.checked_at("shop") or 0.0
        wait_for(lambda b=before: (store.checked_at("shop") or 0.0) > b, 30,  # type: ignore[misc]
                 what="a check")


def force_push(remote: GitRemote, sha: str) -> None:
    """Move the branch to ``sha``, backwards too (a rollback by reset and force push)."""
    run_git(remote.work, "reset", "-q", "--hard", sha)
    run_git(remote.work, "push", "-q", "--force", "origin", f"HEAD:{remote.branch}")


def test_a_rollback_and_a_roll_forward_each_run_once_with_two_workers(
        remote: GitRemote, rclient: redis.Redis, services: Start, env_for: EnvFor,
        redis_url: str, state_dir: Path, tmp_path: Path) -> None:
    out = shared_dir(tmp_path)
    a = remote.commit({"appspec.yaml": appspec_yaml(env_job(out))}, "A")
    env = env_for(remote, interval=1.0)
    for tag in ("1", "2"):  # two workers and two beats share one Redis
        services("worker", env, f"worker{tag}"), services("beat", env, f"beat{tag}")
    assert finished(rclient, 1)[0].sha == a
    b = remote.commit({"appspec.yaml": appspec_yaml(env_job(out)), "v": "2"}, "B")
    assert finished(rclient, 2)[1].sha == b
    force_push(remote, a)  # rollback: B -> A
    assert finished(rclient, 3)[2].sha == a
    force_push(remote, b)  # and forward again: A -> B
    assert finished(rclient, 4)[3].sha == b
    wait_checks(rclient, 4)  # re-checks of an unchanged commit run nothing

    history = runs(rclient, "shop")
    assert [(r.sha, r.status, r.deployment, r.previous_sha) for r in history] == [
        (a, "succeeded", 1, None), (b, "succeeded", 2, a), (a, "succeeded", 3, b),
        (b, "succeeded", 4, a)]
    assert (out / "env.log").read_text().splitlines() == [
        f"{a} prev=[]", f"{b} prev=[{a}]", f"{a} prev=[{b}]", f"{b} prev=[{a}]"]

    env_cli = cli_env(POSTDEPLOY_REDIS_URL=redis_url)
    shown = cli(state_dir, "history", "shop", "--json", env=env_cli)
    assert shown.returncode == 0, shown.stderr
    assert [(r["sha"], r["deployment"], r["previous_sha"])
            for r in json.loads(shown.stdout)["runs"]] == [
        (b, 4, a), (a, 3, b), (b, 2, a), (a, 1, None)]
    status = cli(state_dir, "status", "--json", env=env_cli)
    assert status.returncode == 0, status.stderr
    (row,) = json.loads(status.stdout)["apps"]
    assert row["deployment"]["id"] == 4 and row["deployment"]["previous_sha"] == a
    assert row["latest_run"]["previous_sha"] == a
    assert f"#4 from {a[:7]}" in cli(state_dir, "status", env=env_cli).stdout


def test_a_quick_rollback_supersedes_the_queued_run_and_runs_the_old_commit_again(
        remote: GitRemote, rclient: redis.Redis, services: Start, env_for: EnvFor,
        tmp_path: Path) -> None:
    out = shared_dir(tmp_path)
    a = remote.commit({"appspec.yaml": appspec_yaml(env_job(out, "go"))}, "A")
    env = env_for(remote, interval=1.0)
    services("worker", env), services("beat", env)
    wait_for(lambda: [r.status for r in runs(rclient, "shop")] == ["running"], 40,
             what="A's run to start (it holds the app until the test lets it go)")
    b = remote.commit({"appspec.yaml": appspec_yaml(env_job(out, "go")), "v": "2"}, "B")
    wait_for(lambda: len(runs(rclient, "shop")) == 2, 30, what="B's run to be queued")
    force_push(remote, a)  # back to A before B's run could start: A -> B -> A
    wait_for(lambda: len(runs(rclient, "shop")) == 3, 30, what="A's second deployment")
    (out / "go").touch()
    done = finished(rclient, 3)
    assert [(r.sha, r.status, r.deployment) for r in done] == [
        (a, "succeeded", 1), (b, "superseded", 2), (a, "succeeded", 3)]
    assert "deployment 2" in (done[1].reason or "") and "deployment 3" in (done[1].reason or "")
    assert (out / "env.log").read_text().splitlines() == [f"{a} prev=[]", f"{a} prev=[{b}]"]


def path_host(fleet: Fleet, name: str) -> Host:
    return fleet.add(name, extra_env={"HOST_LABEL": name})


def test_a_path_fleet_runs_each_deployment_once_and_a_host_behind_changes_nothing(
        fleet: Fleet, remote: GitRemote, rclient: redis.Redis, tmp_path: Path) -> None:
    out = shared_dir(tmp_path)
    job = env_job(out) + f'; echo "$HOST_LABEL" >> {out}/hosts.log'
    a = remote.commit({"appspec.yaml": appspec_yaml(job)}, "A")
    one, two = path_host(fleet, "host-1"), path_host(fleet, "host-2")
    one.start(), two.start()
    assert finished(rclient, 1)[0].sha == a
    store = StateStore(rclient)

    b = remote.commit({"appspec.yaml": appspec_yaml(job), "v": "2"}, "B")
    one.pull()  # host-1 moves A -> B: the fleet's deployment of B; host-2 is behind
    ran_b = finished(rclient, 2)[1]
    assert (ran_b.sha, ran_b.host, ran_b.previous_sha) == (b, "host-1", a)
    wait_checks(rclient, 4)  # host-2 still at A: it never undoes the fleet's commit
    assert store.last_seen("shop") == b and len(runs(rclient, "shop")) == 2

    two.pull()  # host-2 follows to B: it joins that deployment, no second run
    wait_for(lambda: store.deployments.current_id("shop") == 2 and any(
        i.host == "host-2" and i.sha == b for i in registry_live(rclient)), 30,
        what="host-2 to report B")
    wait_checks(rclient, 4)
    assert len(runs(rclient, "shop")) == 2

    one.pull(a)  # the fleet moves back: host-1 first (host-2, still at B, is behind now)
    ran_a = finished(rclient, 3)[2]
    assert (ran_a.sha, ran_a.host, ran_a.deployment, ran_a.previous_sha) == (
        a, "host-1", 3, b)
    wait_checks(rclient, 4)
    assert store.last_seen("shop") == a  # host-2 at B does not flip it back
    two.pull(a)  # then host-2: the same deployment
    wait_for(lambda: any(i.host == "host-2" and i.sha == a for i in registry_live(rclient)),
             30, what="host-2 to report A")
    wait_checks(rclient, 4)
    assert [(r.sha, r.status, r.deployment) for r in runs(rclient, "shop")] == [
        (a, "succeeded", 1), (b, "succeeded", 2), (a, "succeeded", 3)]
    assert (out / "env.log").read_text().splitlines() == [
        f"{a} prev=[]", f"{b} prev=[{a}]", f"{a} prev=[{b}]"]


def registry_live(client: redis.Redis) -> list[Instance]:
    return InstanceRegistry(client).live("shop")
