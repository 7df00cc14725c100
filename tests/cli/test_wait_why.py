"""`postdeploy wait` (a pipeline waits for a deployment's job) and `postdeploy why`
(a commit's story), through the real CLI against real workers, git and Redis."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import redis

from postdeploy.services.metrics import queue_length
from postdeploy.store import keys
from tests.announce.test_notify import Receiver
from tests.support.clirun import cli, cli_env
from tests.support.core import (
    GitRemote,
    Service,
    appspec_yaml,
    finished_runs,
    run_git,
    runs,
    wait_for,
)
from tests.support.hosts import Fleet

Start = Callable[..., Service]
UNACKED = keys.CELERY_PREFIX + "unacked"  # kombu's hash of messages taken, not yet acked
EnvFor = Callable[..., dict[str, str]]


def pd(redis_url: str, where: Path, *args: str, timeout: float = 120
       ) -> subprocess.CompletedProcess[str]:
    return cli(where, *args, env=cli_env(POSTDEPLOY_REDIS_URL=redis_url), timeout=timeout)


def start(remote: GitRemote, services: Start, env_for: EnvFor, client: redis.Redis) -> None:
    env = env_for(remote)
    services("worker", env)
    services("beat", env)
    # The executor runs before any pipeline waits on it: its apps are registered.
    wait_for(lambda: client.hexists("postdeploy:apps", "shop"), 30, what="shop registered")


def test_wait_exits_zero_for_a_deployment_that_succeeds_and_one_for_one_that_fails(
        remote: GitRemote, redis_url: str, rclient: redis.Redis, services: Start,
        env_for: EnvFor, tmp_path: Path) -> None:
    c1 = remote.commit({"appspec.yaml": appspec_yaml("sleep 3; echo seeded")})
    start(remote, services, env_for, rclient)
    ok = pd(redis_url, tmp_path, "wait", "shop", "--sha", c1, "--timeout", "60")
    assert ok.returncode == 0, ok.stderr
    assert "waiting (" in ok.stderr and f"({c1[:7]}): succeeded on " in ok.stderr

    # Called right after the deploy step: the commit is not seen yet.
    c2 = remote.commit({"appspec.yaml": appspec_yaml("echo broken; exit 3")})
    bad = pd(redis_url, tmp_path, "wait", "shop", "--sha", c2, "--timeout", "60",
             "--json")
    assert bad.returncode == 1
    assert "failed" in bad.stderr and "exit 3" in bad.stderr
    verdict = json.loads(bad.stdout)
    assert verdict["state"] == "failed" and verdict["deployment"] == 2

    # The rollback to c1 is a deployment of its own: waited for and judged anew.
    run_git(remote.work, "reset", "-q", "--hard", c1)  # a rollback: reset, force push
    run_git(remote.work, "push", "-q", "--force", "origin", "HEAD:main")
    again = pd(redis_url, tmp_path, "wait", "shop", "--sha", c1, "--timeout", "60")
    assert again.returncode == 0, again.stderr
    assert "deployment 3" in again.stderr


def test_wait_for_a_deployment_that_never_starts_says_why(
        remote: GitRemote, redis_url: str, rclient: redis.Redis, services: Start,
        env_for: EnvFor, tmp_path: Path) -> None:
    remote.commit({"appspec.yaml": appspec_yaml("echo hi")})
    start(remote, services, env_for, rclient)
    wait_for(lambda: finished_runs(rclient, "shop"), 60, what="the first run")
    never = pd(redis_url, tmp_path, "wait", "shop", "--sha", "ab" * 20, "--timeout", "3")
    assert never.returncode == 1
    assert f"gave up after 3 s: {'ab' * 3 + 'a'} has not been deployed: the app is at " in \
        never.stderr
    c2 = remote.commit({"appspec.yaml": appspec_yaml(None)}, "no command")
    nothing = pd(redis_url, tmp_path, "wait", "shop", "--sha", c2, "--timeout", "60")
    assert nothing.returncode == 1
    assert "no job, POST_DEPLOY_COMMAND is not set at this commit" in nothing.stderr
    unknown = pd(redis_url, tmp_path, "wait", "nope")
    assert unknown.returncode == 2 and "unknown app 'nope'" in unknown.stderr


def test_why_tells_a_superseded_a_cancelled_and_a_skipped_commit(
        remote: GitRemote, redis_url: str, rclient: redis.Redis, services: Start,
        env_for: EnvFor, tmp_path: Path) -> None:
    slow = remote.commit({"appspec.yaml": appspec_yaml("sleep 30")}, "slow")
    start(remote, services, env_for, rclient)
    running = wait_for(lambda: next((r for r in runs(rclient, "shop")
                                     if r.status == "running"), None), 60,
                       what="the slow run")
    passed = remote.commit({"appspec.yaml": appspec_yaml("echo passed-over")}, "passed")
    wait_for(lambda: any(r.sha == passed for r in runs(rclient, "shop")), 30,
             what="a queued run of the passed-over commit")
    latest = remote.commit({"appspec.yaml": appspec_yaml(None)}, "no command")
    assert pd(redis_url, tmp_path, "cancel", "shop", running.id).returncode == 0
    wait_for(lambda: any(r.sha == passed and r.status == "superseded"
                         for r in runs(rclient, "shop")), 60, what="the superseded run")

    cancelled = pd(redis_url, tmp_path, "why", "shop", slow)
    assert cancelled.returncode == 0, cancelled.stderr
    text = cancelled.stdout
    assert text.startswith(f"shop@{slow}\n")
    assert "deployment 1 began (the app's first)" in text
    assert "found the branch at this commit" in text
    assert f"run {running.id} queued automatically for deployment 1" in text
    assert f"run {running.id} cancelled" in text and "cancelled from the CLI by" in text
    assert "verdict: deployment 1" in text and "cancelled" in text.splitlines()[-1]

    superseded = pd(redis_url, tmp_path, "why", "shop", passed[:8], "--json")
    story = json.loads(superseded.stdout)
    whats = [e["what"] for e in story["events"]]
    assert any("skipped (superseded)" in w for w in whats), whats
    assert any(w.startswith("replaced by deployment 3") for w in whats), whats
    assert story["verdict"]["state"] in ("replaced", "failed")

    skipped = pd(redis_url, tmp_path, "why", "shop")  # the current commit
    assert f"shop@{latest}" in skipped.stdout
    assert "skipped, POST_DEPLOY_COMMAND is not set at this commit" in skipped.stdout
    assert [e.returncode for e in (pd(redis_url, tmp_path, "why", "shop", "zz"),)] == [1]


def test_a_scope_instance_deployment_on_three_hosts_gets_one_verdict_and_one_message(
        fleet: Fleet, remote: GitRemote, rclient: redis.Redis, tmp_path: Path) -> None:
    fixed = tmp_path / "fixed"
    fixed.mkdir(mode=0o777)
    fixed.chmod(0o777)  # the jobs' user reads it
    job = (f'[ "$HOST_LABEL" != host-c ] || [ -e {fixed}/ok ] || exit 2; '
           'echo "ran on $HOST_LABEL"')
    remote.commit({"appspec.yaml": appspec_yaml(None)}, "before: no job")
    receiver = Receiver().start()
    try:
        hosts = [fleet.add(name, extra_env={
            "HOST_LABEL": name, "POSTDEPLOY_NOTIFY": receiver.url(),
            "POSTDEPLOY_NOTIFY_ON": "failed,succeeded"}) for name in ("host-a", "host-b",
                                                                   "host-c")]
        for host in hosts:
            host.start()
        # The fleet is up (every instance reporting) before the deployment comes.
        wait_for(lambda: rclient.hlen("postdeploy:app:shop:instances") == 3, 60,
                 what="three live instances")
        c1 = remote.commit({"appspec.yaml": appspec_yaml(job, envs={
            "POST_DEPLOY_SCOPE": "instance"})})
        for host in hosts:
            host.pull()
        result = pd(fleet.redis_url, tmp_path, "wait", "shop", "--sha", c1, "--timeout", "90")
        assert result.returncode == 1
        assert "succeeded on 2 of 3 hosts; failed on host-c: exit 2" in result.stderr
        assert len(finished_runs(rclient, "shop")) == 3
        status = pd(fleet.redis_url, tmp_path, "status")
        assert "shop: deployment 2" in status.stdout and "2 of 3 hosts" in status.stdout

        # One message for the deployment, not one per host.
        message = receiver.wait(1)[0]
        assert message["title"] == f"postdeploy: shop@{c1[:7]} failed"
        assert "Hosts: succeeded on 2 of 3 hosts; failed on host-c: exit 2" in \
            message["message"]
        # Every notification task sent for the three runs has been taken and done.
        wait_for(lambda: queue_length(rclient) == 0 and not rclient.hlen(UNACKED), 30,
                 what="the notification tasks to be done")
        assert len(receiver.messages) == 1

        (fixed / "ok").write_text("")
        again = pd(fleet.redis_url, tmp_path, "run", "shop", "--failed-hosts", "--wait")
        assert again.returncode == 0, again.stderr
        assert "ran on host-c" in again.stdout and "host-a" not in again.stdout
        manual = [r for r in runs(rclient, "shop") if r.trigger == "manual"]
        assert [(r.host, r.status) for r in manual] == [("host-c", "succeeded")]
    finally:
        receiver.stop()
