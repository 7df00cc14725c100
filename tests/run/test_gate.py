"""The readiness gate in real runs: waiting never holds a worker; hostile gates end bounded."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import yaml

from tests.support.core import GitRemote, Service, appspec_yaml, runs, service_env, wait_for
from tests.support.standin import AppStandIn

Start = Callable[..., Service]


@pytest.fixture
def standin() -> Iterator[AppStandIn]:
    app = AppStandIn()
    yield app
    app.close()


def fleet_of(tmp_path: Path, specs: dict[str, str]) -> Path:
    """One repo app per entry (name -> appspec.yaml); the postdeploy.yaml listing them."""
    apps = []
    for name, text in specs.items():
        remote = GitRemote(tmp_path / "git", name)
        remote.commit({"appspec.yaml": text})
        apps.append({"name": name, "repo": remote.url})
    config = tmp_path / "postdeploy.yaml"
    config.write_text(yaml.safe_dump({"apps": apps}))
    return config


def latest(client: redis.Redis, app: str) -> str | None:
    found = runs(client, app)
    return found[-1].status if found else None


def test_twenty_waiting_apps_never_delay_another_apps_job(
        tmp_path: Path, redis_url: str, rclient: redis.Redis, services: Start,
        standin: AppStandIn) -> None:
    standin.mode = "502"  # these apps never come up during the test
    waiting = {f"slow-{i}": appspec_yaml("echo slow", envs={
        "POST_DEPLOY_WAIT_URL": standin.url, "POST_DEPLOY_WAIT_TIMEOUT": "600"})
        for i in range(20)}
    quick = GitRemote(tmp_path / "git", "quick")
    quick.commit({"appspec.yaml": appspec_yaml("echo quick")})
    config = fleet_of(tmp_path, waiting)
    data = yaml.safe_load(config.read_text())
    data["apps"].append({"name": "quick", "repo": quick.url})
    config.write_text(yaml.safe_dump(data))
    env = service_env(redis_url, tmp_path / "state", POSTDEPLOY_CONFIG=str(config))
    services("worker", env), services("beat", env)

    wait_for(lambda: all(latest(rclient, name) == "waiting" for name in waiting), 60, 0.5,
             what="20 apps waiting for their app")
    wait_for(lambda: latest(rclient, "quick") == "succeeded", 20, what="the first quick run")
    sha = quick.commit({"appspec.yaml": appspec_yaml("echo quick again")})
    run = wait_for(lambda: next((r for r in runs(rclient, "quick")
                                 if r.sha == sha and r.started_at), None), 20,
                   what="the quick app's new job to start")
    assert run.queued_at is not None and run.started_at - run.queued_at < 5.0
    assert all(latest(rclient, name) == "waiting" for name in waiting)
    assert standin.requests >= 20  # each waiting app was probed, none held a process


def test_hostile_gates_and_scopes_are_error_runs_or_bounded(
        tmp_path: Path, redis_url: str, rclient: redis.Redis, services: Start,
        standin: AppStandIn) -> None:
    hang = AppStandIn(mode="hang")
    loop = AppStandIn(mode="loop")
    big = AppStandIn(mode="big")
    try:
        def gate(url: str, **extra: str) -> str:
            return appspec_yaml("echo ran", envs={"POST_DEPLOY_WAIT_URL": url, **extra})

        config = fleet_of(tmp_path, {
            "file": gate("file:///etc/passwd"),
            "gopher": gate("gopher://127.0.0.1:70/"),
            "creds": gate("http://admin:hunter2@127.0.0.1/health"),
            "expanded": gate("$HEALTH", HEALTH="file:///etc/shadow"),
            "scope": appspec_yaml("echo ran", envs={"POST_DEPLOY_SCOPE": "everywhere"}),
            "hang": gate(hang.url, POST_DEPLOY_WAIT_TIMEOUT="4"),
            "loop": gate(loop.url, POST_DEPLOY_WAIT_TIMEOUT="4"),
            "big": gate(big.url, POST_DEPLOY_WAIT_TIMEOUT="4",
                        POST_DEPLOY_WAIT_FOR_COMMIT="true"),
        })
        env = service_env(redis_url, tmp_path / "state", POSTDEPLOY_CONFIG=str(config))
        worker, _ = services("worker", env), services("beat", env)
        expected = {
            "file": ("error", "POST_DEPLOY_WAIT_URL uses file://; only http:// and https://"),
            "gopher": ("error", "POST_DEPLOY_WAIT_URL uses gopher://"),
            "creds": ("error", "POST_DEPLOY_WAIT_URL carries credentials"),
            "expanded": ("error", "POST_DEPLOY_WAIT_URL uses file://"),
            "scope": ("error", "invalid POST_DEPLOY_SCOPE: 'everywhere'"),
            "hang": ("failed", f"not ready: {hang.url} last answered nothing within 3 s"),
            "loop": ("failed", f"not ready: {loop.url} last answered 302, a redirect loop"),
            "big": ("failed", f"not ready: {big.url} last answered 200 without commit"),
        }

        def ended() -> dict[str, tuple[str, str]] | None:
            found = {}
            for name in expected:
                done = [r for r in runs(rclient, name)
                        if r.status not in ("queued", "waiting", "running")]
                if not done:
                    return None
                found[name] = (done[0].status, done[0].reason or "")
            return found

        outcome = wait_for(ended, 60, 0.5, what="every hostile run to end")
        for name, (status, reason) in expected.items():
            assert outcome[name][0] == status, (name, outcome[name])
            assert outcome[name][1].startswith(reason), (name, outcome[name])
        assert "hunter2" not in worker.log()
        assert all(r.started_at is None for name in expected for r in runs(rclient, name))
        assert worker.alive()
    finally:
        for server in (hang, loop, big):
            server.close()


def test_a_dribbling_gate_ends_at_its_wait_timeout_and_other_apps_go_on(
        tmp_path: Path, redis_url: str, rclient: redis.Redis, services: Start) -> None:
    dribble = AppStandIn(mode="dribble")  # a byte every 0.5 s: under any read timeout
    try:
        config = fleet_of(tmp_path, {"slow": appspec_yaml("echo slow", envs={
            "POST_DEPLOY_WAIT_URL": dribble.url, "POST_DEPLOY_WAIT_TIMEOUT": "8"})})
        # Scope instance: its runs are placed by the host's own loop, which reports
        # every app's readiness too; it must not wait on the slow app's endpoint.
        other = GitRemote(tmp_path / "git", "other")
        instance = {"POST_DEPLOY_SCOPE": "instance"}
        other.commit({"appspec.yaml": appspec_yaml("echo other", envs=instance)})
        data = yaml.safe_load(config.read_text())
        data["apps"].append({"name": "other", "repo": other.url})
        config.write_text(yaml.safe_dump(data))
        env = service_env(redis_url, tmp_path / "state", POSTDEPLOY_CONFIG=str(config))
        worker, _ = services("worker", env), services("beat", env)

        wait_for(lambda: latest(rclient, "slow") == "waiting", 60, 0.2,
                 what="the slow app's run to wait")
        wait_for(lambda: latest(rclient, "other") == "succeeded", 30, what="other's first run")
        sha = other.commit({"appspec.yaml": appspec_yaml("echo other again", envs=instance)})
        run = wait_for(lambda: next((r for r in runs(rclient, "other")
                                     if r.sha == sha and r.status == "succeeded"), None), 30,
                       what="the other app's new commit to run")
        assert run.queued_at is not None

        ended = wait_for(lambda: next((r for r in runs(rclient, "slow")
                                       if r.status not in ("queued", "waiting")), None), 40,
                         0.2, what="the slow app's run to end")
        assert ended.status == "failed", ended
        reason = ended.reason or ""
        assert reason.startswith(f"not ready: {dribble.url} last answered no complete "
                                 "answer within"), reason
        waited = float(reason.rsplit("after ", 1)[1].split()[0])
        assert 8 <= waited < 12, reason  # cut at the wait timeout, even mid-read
        assert ended.started_at is None and worker.alive()
    finally:
        dribble.close()
