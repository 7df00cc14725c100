"""Commit statuses `postdeploy/<app>` on GitHub, GitLab and Gitea, through real workers.

A local stand-in (tests/githost_standin.py) accepts only each provider's
documented request shape and keeps what it received, in order.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from postdeploy.config.settings import Settings
from postdeploy.errors import ConfigError
from tests.support.clirun import cli, cli_env
from tests.support.core import GitRemote, Service, appspec_yaml, finished_runs, output_of, wait_for
from tests.support.githost_standin import GitHostStandIn

Start = Callable[..., Service]
TOKEN = "ghp_s3cretStatusToken42"


@pytest.fixture
def standins() -> Iterator[Callable[..., GitHostStandIn]]:
    started: list[GitHostStandIn] = []

    def make(provider: str, mode: str = "ok") -> GitHostStandIn:
        standin = GitHostStandIn(provider, TOKEN, mode)
        started.append(standin)
        return standin

    yield make
    for standin in started:
        standin.stop()


def start_with_status(tmp_path: Path, remote: GitRemote, redis_url: str, services: Start,
                      standin: GitHostStandIn, **extra: str) -> Service:
    config = tmp_path / "postdeploy.yaml"
    config.write_text(json.dumps({"apps": [{
        "name": "shop", "repo": remote.url, "commit_status": {
            "provider": standin.provider, "repository": "acme/shop",
            "api_url": standin.api_url}}]}))
    env = cli_env(POSTDEPLOY_REDIS_URL=redis_url, POSTDEPLOY_STATE_DIR=str(tmp_path / "state"),
                  POSTDEPLOY_CHECK_INTERVAL="1", POSTDEPLOY_CONFIG=str(config),
                  POSTDEPLOY_STATUS_TOKEN=TOKEN, POSTDEPLOY_NOTIFY_BACKOFF="0.2", **extra)
    worker = services("worker", env)
    services("beat", env)
    return worker


def wait_finished(client: redis.Redis, count: int) -> None:
    wait_for(lambda: len(finished_runs(client, "shop")) >= count, 60,
             what=f"{count} finished run(s)")


@pytest.mark.parametrize("provider,states", [
    ("github", ["pending", "success", "pending", "failure"]),
    ("gitlab", ["running", "success", "running", "failed"]),
    ("gitea", ["pending", "success", "pending", "failure"]),
])
def test_each_run_is_reported_pending_then_with_its_result_in_the_providers_shape(
        provider: str, states: list[str], tmp_path: Path, remote: GitRemote, redis_url: str,
        rclient: redis.Redis, services: Start,
        standins: Callable[..., GitHostStandIn]) -> None:
    standin = standins(provider)
    # The job looks for the token in its environment: it must not be there.
    c1 = remote.commit({"appspec.yaml": appspec_yaml("env | grep -c s3cretStatus || true")})
    worker = start_with_status(tmp_path, remote, redis_url, services, standin)
    wait_finished(rclient, 1)
    c2 = remote.commit({"appspec.yaml": appspec_yaml("echo broken; exit 3")})
    got = standin.wait(4)
    assert not standin.complaints
    assert [s.state for s in got] == states
    assert [s.path.rsplit("/", 1)[1] for s in got] == [c1, c1, c2, c2]
    assert {s.context for s in got} == {"postdeploy/shop"}
    assert got[1].description.startswith("succeeded in ")
    assert "exited with code 3" in got[3].description
    first = finished_runs(rclient, "shop")[0]
    assert output_of(rclient, first.id).strip() == "0"
    assert TOKEN not in worker.log()


def test_a_git_host_that_dribbles_its_answer_gives_up_on_time_and_the_run_is_unchanged(
        tmp_path: Path, remote: GitRemote, redis_url: str, rclient: redis.Redis,
        services: Start, standins: Callable[..., GitHostStandIn]) -> None:
    standin = standins("github", mode="dribble")
    remote.commit({"appspec.yaml": appspec_yaml("echo hi")})
    worker = start_with_status(tmp_path, remote, redis_url, services, standin)
    wait_finished(rclient, 1)
    assert finished_runs(rclient, "shop")[0].status == "succeeded"
    # Each try ends at its 10 s deadline though the server keeps sending; after the
    # last try (pending and result: 4 each) a WARNING, and the record stays as it was.
    began = time.monotonic()
    wait_for(lambda: "could not send the succeeded commit status" in worker.log(), 120,
             what="the WARNING after the last try")
    assert "no whole answer within 10 s" in worker.log()
    assert time.monotonic() - began < 100
    assert finished_runs(rclient, "shop")[0].status == "succeeded"


@pytest.mark.parametrize("value,message", [
    ("bitbucket", "provider must be one of github, gitlab, gitea, not 'bitbucket'"),
    ({"provider": "github", "token": "x"}, "unknown field 'token'"),
    ({"provider": "github", "api_url": "http://git.example.com/api"},
     "would send the token unencrypted"),
    ({"provider": "github", "token_env": "GITHUB_TOKEN"},
     "token_env 'GITHUB_TOKEN' must name a POSTDEPLOY_* variable"),
    ({"provider": "gitea", "repository": "../x"}, "repository '../x' is not owner/name"),
])
def test_a_bad_commit_status_setting_is_one_line_and_exit_2(
        tmp_path: Path, value: object, message: str) -> None:
    config = tmp_path / "postdeploy.yaml"
    config.write_text(json.dumps({"apps": [{"name": "shop", "repo": "https://git.example.com/"
                                            "acme/shop.git", "commit_status": value}]}))
    result = cli(tmp_path / "state", "--config", str(config), "status")
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_repository_and_api_default_from_the_apps_remote_url(tmp_path: Path) -> None:
    config = tmp_path / "postdeploy.yaml"
    config.write_text(json.dumps({"apps": [
        {"name": "a", "repo": "https://github.com/acme/shop.git", "commit_status": "github"},
        {"name": "b", "repo": "git@gitlab.example.com:group/sub/blog.git",
         "commit_status": "gitlab"},
        {"name": "c", "repo": "https://gitea.example.com/acme/wiki", "commit_status": "gitea"},
        {"name": "d", "path": str(tmp_path), "commit_status": "github"}][:3]}))
    settings = Settings.load({"POSTDEPLOY_CONFIG": str(config)})
    found = [(a.commit_status.repository, a.commit_status.api_url) for a in settings.apps
             if a.commit_status]
    assert found == [("acme/shop", "https://api.github.com"),
                     ("group/sub/blog", "https://gitlab.example.com/api/v4"),
                     ("acme/wiki", "https://gitea.example.com/api/v1")]
    config.write_text(json.dumps({"apps": [{"name": "d", "path": str(tmp_path),
                                            "commit_status": "github"}]}))
    with pytest.raises(ConfigError, match="give 'repository'"):
        Settings.load({"POSTDEPLOY_CONFIG": str(config)})
