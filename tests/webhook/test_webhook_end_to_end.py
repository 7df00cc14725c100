"""The push trigger end to end: a real worker (or a whole `postdeploy up`) behind a real
webhook service; what ran is read from the run history in Redis."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import psutil
import redis

from postdeploy.store import keys
from postdeploy.store.celery_app import QUEUE
from tests.support.clirun import cli_env, family, interrupt
from tests.support.core import (
    GitRemote,
    RedisServer,
    Service,
    appspec_yaml,
    finished_runs,
    free_port,
    runs,
    wait_for,
)
from tests.support.webhook_client import (
    cli_run,
    github_push,
    healthy,
    post,
    post_concurrently,
    queued_checks,
    raw_request,
    signed,
    start_hook,
)

SECRET = "e2e-webhook-secret-7a2c"


def test_200_concurrent_deliveries_are_all_answered_and_the_commit_runs_once(
        redis_url: str, rclient: redis.Redis, remote: GitRemote, tmp_path: Path,
        services: Any, env_for: Any) -> None:
    remote.commit({"appspec.yaml": appspec_yaml('echo "job for $COMMIT_SHA"')})
    env = env_for(remote, interval=3600, POSTDEPLOY_WEBHOOK_SECRET=SECRET)
    worker = services("worker", env)
    wait_for(lambda: rclient.hexists(keys.APPS, "shop") or not worker.alive(), 60,
             what="worker ready")
    port = free_port()
    hook_service = start_hook(env, tmp_path / "webhook.log", port, processes=2)
    try:
        for round_ in range(2):
            sha = remote.commit({"appspec.yaml": appspec_yaml('echo "job for $COMMIT_SHA"'),
                                 "n": str(round_)})
            payload = {"repository": remote.url, "ref": "refs/heads/main"}
            requests = []
            for _ in range(200):
                body, headers = signed("generic", SECRET, payload)
                requests.append(raw_request("/hooks/generic", body, headers))
            answers = post_concurrently(port, requests)
            assert [status for status, _ in answers] == [202] * 200
            wait_for(lambda s=sha: [r for r in finished_runs(rclient, "shop") if r.sha == s],
                     60, what=f"the run of round {round_}")
        wait_for(lambda: rclient.llen(keys.CELERY_PREFIX + QUEUE) == 0, 30,
                 what="the queue to drain")
        history = runs(rclient, "shop")
        # No beat runs and the interval is an hour: only the webhook started these.
        assert [(r.sha, r.trigger, r.status) for r in history] == [
            (r.sha, "auto", "succeeded") for r in history]
        assert len(history) == 2 and len({r.sha for r in history}) == 2
    finally:
        hook_service.stop(signal.SIGTERM)
    assert hook_service.proc.returncode == 0, hook_service.log()[-2000:]


def test_redis_outage_is_503_and_the_service_recovers(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis").start()
    env = cli_env(POSTDEPLOY_REDIS_URL=server.url, POSTDEPLOY_REPO="https://github.com/acme/shop",
                  POSTDEPLOY_APP="shop", POSTDEPLOY_STATE_DIR=str(tmp_path / "state"),
                  POSTDEPLOY_WEBHOOK_SECRET=SECRET)
    port = free_port()
    service = start_hook(env, tmp_path / "webhook.log", port)
    try:
        server.stop()
        body, headers = signed("github", SECRET, github_push("acme/shop"), delivery="d-1")
        down = post(port, "/hooks/github", body, headers)
        assert down.status == 503 and "retry later" in down.body["error"]
        assert service.alive()
        server.start()
        again = post(port, "/hooks/github", body, headers)  # the host's retry
        assert (again.status, again.body["apps"]) == (202, ["shop"])
        assert queued_checks(server.client()) == ["shop"]
    finally:
        service.stop(signal.SIGTERM)
        server.stop()
    assert "Traceback" not in service.log()


def test_a_frozen_redis_is_answered_503_within_5_s(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis").start()
    env = cli_env(POSTDEPLOY_REDIS_URL=server.url, POSTDEPLOY_REPO="https://github.com/acme/shop",
                  POSTDEPLOY_APP="shop", POSTDEPLOY_STATE_DIR=str(tmp_path / "state"),
                  POSTDEPLOY_WEBHOOK_SECRET=SECRET)
    port = free_port()
    service = start_hook(env, tmp_path / "webhook.log", port)
    assert server.proc is not None
    try:
        # One delivery first, so the service's connections to Redis are open when it freezes.
        body, headers = signed("github", SECRET, github_push("acme/shop"))
        assert post(port, "/hooks/github", body, headers).status == 202
        os.kill(server.proc.pid, signal.SIGSTOP)  # accepts, never answers: a hung server
        for delivery in ("frozen-1", "frozen-2"):
            body, headers = signed("github", SECRET, github_push("acme/shop"),
                                   delivery=delivery)
            started = time.monotonic()
            frozen = post(port, "/hooks/github", body, headers, timeout=30)
            took = time.monotonic() - started
            assert frozen.status == 503 and "retry later" in frozen.body["error"], frozen
            assert took < 5.0, took
        assert healthy(port) and service.alive()
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    try:
        def fresh_push() -> Any:
            body, headers = signed("github", SECRET, github_push("acme/shop"))
            reply = post(port, "/hooks/github", body, headers)
            return reply.status != 503 and reply

        after = wait_for(fresh_push, 30, what="an answer once Redis is back")
        assert after.status == 202
    finally:
        service.stop(signal.SIGTERM)
        server.stop()
    assert "Traceback" not in service.log()


def secret_holders(pids: list[int]) -> set[str]:
    """The commands (module and subcommand) of the processes whose environment has the secret."""
    found = set()
    for pid in pids:
        try:
            process = psutil.Process(pid)
            if process.environ().get("POSTDEPLOY_WEBHOOK_SECRET") == SECRET:
                found.add(" ".join(process.cmdline()[1:4]))
        except psutil.Error:  # a job that ended meanwhile
            continue
    return found


def test_up_runs_the_webhook_service(tmp_path: Path, remote: GitRemote) -> None:
    remote.commit({"appspec.yaml": appspec_yaml('echo "[POST-DEPLOY] at $COMMIT_SHA"')})
    state_dir = tmp_path / "state"
    port = free_port()
    args = ["-m", "postdeploy.cli", "up", "--repo", remote.url, "--name", "shop",
            "--interval", "3600", "--state-dir", str(state_dir), "--webhook-port", str(port)]
    refused = cli_run(args, cli_env())
    assert refused.returncode == 2 and "POSTDEPLOY_WEBHOOK_SECRET" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    up = Service(args, cli_env(POSTDEPLOY_WEBHOOK_SECRET=SECRET), tmp_path / "up.log",
                 cwd=tmp_path)
    try:
        wait_for(lambda: healthy(port) or not up.alive(), 60, what="up's webhook service")
        assert f"webhook http://127.0.0.1:{port}/hooks/" in up.log()
        # Only the webhook service holds the secret, not the worker that runs jobs.
        assert secret_holders(family(up.proc.pid)[1:]) == {"-m postdeploy.cli webhook"}
        client = redis.Redis.from_url((state_dir / "redis.url").read_text().strip())
        wait_for(lambda: finished_runs(client, "shop"), 60, what="the start-up run")
        sha = remote.commit({"appspec.yaml": appspec_yaml('echo "[POST-DEPLOY] at $COMMIT_SHA"'),
                             "v": "2"})
        started = time.monotonic()
        payload = github_push("acme/shop")
        payload["repository"].update(clone_url=remote.url)
        body, headers = signed("github", SECRET, payload)
        assert post(port, "/hooks/github", body, headers).body["apps"] == ["shop"]
        run = wait_for(lambda: [r for r in finished_runs(client, "shop") if r.sha == sha], 60,
                       what="the pushed commit's run")[0]
        # The interval is an hour: the push, not the poll, ran it.
        assert run.status == "succeeded" and time.monotonic() - started < 60
        assert f"[POST-DEPLOY] shop@{sha[:7]} | at {sha}" in up.log()
    finally:
        code = interrupt(up)
    assert code == 0, up.log()[-3000:]
    assert state_dir.exists() and "Traceback" not in up.log()
