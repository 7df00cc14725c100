"""Hostile and broken input, one table: each row's defined outcome, nothing executed
that the app did not ask for (the row's marker file), the service still running.

docs/reliability.md's table states each row's outcome.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import yaml

from postdeploy.config.settings import AppConfig
from postdeploy.errors import GitError
from postdeploy.source.git import AppSource
from tests.faults.conftest import Executor, FaultScope
from tests.faults.harness import send_run_job
from tests.support.core import (
    GitRemote,
    RedisServer,
    appspec_yaml,
    runs,
    service_env,
    wait_for,
)

BOMB = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
envs: *i
"""


@dataclass(frozen=True)
class Row:
    """One hostile appspec: files of the commit, the run's status, a reason or log line."""

    name: str
    files: Callable[[str], dict[str, str | bytes]]  # marker command -> commit files
    status: str
    expect: str  # in the run's reason ("error") or the worker log (fallbacks)
    timeout: int | None = None


def spec(**kwargs: str) -> Callable[[str], dict[str, str | bytes]]:
    return lambda touch: {"appspec.yaml": appspec_yaml(touch, **kwargs)}


def envs(entries: object) -> Callable[[str], dict[str, str | bytes]]:
    def files(touch: str) -> dict[str, str | bytes]:
        data = {"envs": [{"key": "POST_DEPLOY_COMMAND", "value": touch}, entries]}
        return {"appspec.yaml": yaml.safe_dump(data, allow_unicode=True)}
    return files


ROWS = [
    Row("YAML bomb (billion laughs)", lambda touch: {"appspec.yaml": BOMB}, "error",
        "YAML aliases (*name) are not supported"),
    Row("appspec.yaml of 10 MB", lambda touch: {
        "appspec.yaml": appspec_yaml(touch) + "# " + "x" * (10 * 2**20) + "\n"},
        "error", "the limit is 1048576 bytes"),
    Row("a list instead of a mapping", lambda touch: {"appspec.yaml": f"- {touch}\n"},
        "error", "top level must be a mapping"),
    Row("non-string value (a mapping)", envs({"key": "NESTED", "value": {"a": 1}}), "error",
        "value must be a string, not a dict"),
    Row("unicode key", envs({"key": "CAFÉ_ÜBER", "value": "x"}), "error",
        "is not a valid environment variable name"),
    Row("POST_DEPLOY_FOLDER absolute", spec(folder="@outside"), "error", "is absolute"),
    Row("POST_DEPLOY_FOLDER ../..", spec(folder="../.."), "error",
        "leaves the repository"),
    Row("POST_DEPLOY_FOLDER symlink out of the repo", lambda touch: {
        "appspec.yaml": appspec_yaml(touch, folder="escape"), "escape": "@symlink"},
        "error", "leads out of the repository through a symlink"),
    Row("POST_DEPLOY_FOLDER missing", spec(folder="no/such/dir"), "error", "does not exist"),
    Row("POST_DEPLOY_TIMEOUT 0", spec(timeout="0"), "succeeded",
        "invalid POST_DEPLOY_TIMEOUT: '0' is not a positive integer", 300),
    Row("POST_DEPLOY_TIMEOUT -1", spec(timeout="-1"), "succeeded",
        "invalid POST_DEPLOY_TIMEOUT: '-1' is not a positive integer", 300),
    Row("POST_DEPLOY_TIMEOUT 1e9", spec(timeout="1e9"), "succeeded",
        "invalid POST_DEPLOY_TIMEOUT: '1e9' is not a positive integer", 300),
    Row("POST_DEPLOY_TIMEOUT 1000000000", spec(timeout="1000000000"), "succeeded",
        "above the maximum 86400 s", 86400),
    Row("POST_DEPLOY_TIMEOUT abc", spec(timeout="abc"), "succeeded",
        "invalid POST_DEPLOY_TIMEOUT: 'abc' is not a positive integer", 300),
    Row("POST_DEPLOY_TIMEOUT empty", spec(timeout=""), "succeeded",
        "POST_DEPLOY_TIMEOUT is empty; using the default 300 s", 300),
    # Last: later rows could not write appspec.yaml through the link.
    Row("appspec.yaml a symlink", lambda touch: {"appspec.yaml": "@symlink"}, "error",
        "appspec.yaml must be a regular file in the repository, not a symlink or directory"),
]


def commit_row(remote: GitRemote, row: Row, touch: str, outside: Path) -> str:
    """Commit the row; "@outside" stands for an absolute path outside the repository."""
    files = row.files(touch)
    for name, content in list(files.items()):
        if isinstance(content, str) and "@outside" in content:
            files[name] = content.replace("@outside", str(outside))
        if content == "@symlink":
            del files[name]
            link = remote.work / name
            if link.is_symlink() or link.is_file():
                link.unlink()
            link.symlink_to(outside)
    return remote.commit(files, row.name)


def test_hostile_input(tmp_path: Path, remote: GitRemote, executor: Callable[..., Executor],
                       fault: FaultScope) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    started = executor(wait_ready=True)
    server, client, worker = started.server, started.client, started.worker

    for index, row in enumerate(ROWS):
        marker = tmp_path / f"marker-{index}"
        with fault(f"hostile appspec: {row.name}"):
            sha = commit_row(remote, row, f"touch {marker}", outside)
            record = wait_for(lambda s=sha: next(  # type: ignore[misc]
                (r for r in runs(client, "shop") if r.sha == s
                 and r.status not in ("queued", "running")), None), 40,
                what=f"the run of {row.name!r}")
            assert record.status == row.status, (row.name, record.reason)
            if row.status == "error":
                assert row.expect in (record.reason or ""), (row.name, record.reason)
                assert not marker.exists(), row.name
            else:
                assert row.expect in worker.log(), row.name
                assert record.timeout == row.timeout
                assert marker.exists()  # the app asked for it
            assert worker.alive()
    assert list(outside.iterdir()) == []

    # Manual re-runs through Celery, as Flower or a script would send them.
    marker = tmp_path / "marker-sha"
    manual = [
        ("sha with shell metacharacters", {"app": "shop", "sha": f"; touch {marker}"},
         "invalid sha"),
        ("sha of 41 hex digits", {"app": "shop", "sha": "a" * 41}, "invalid sha"),
        ("sha not in the repository", {"app": "shop", "sha": "0123456789" * 4},
         "error: commit 012345678901 not found"),
        ("unknown app", {"app": "nope"}, "unknown app 'nope'"),
    ]
    for name, kwargs, expect in manual:
        with fault(f"hostile manual run: {name}"):
            outcome = send_run_job(server.url, remote.url, trigger="manual", **kwargs)
            assert outcome["state"] == "FAILURE", (name, outcome)
            assert expect in outcome["result"], (name, outcome)
            assert not marker.exists()
            assert worker.alive()


@pytest.mark.parametrize("value", ["ext::sh -c touch% {marker}",
                                   "--upload-pack=touch {marker}"])
def test_hostile_repo_url(tmp_path: Path, value: str, fault: FaultScope,
                          private_redis: Callable[..., RedisServer]) -> None:
    server = private_redis()
    marker = tmp_path / "marker"
    repo = value.format(marker=marker)
    with fault(f"hostile repo URL: {value.split(' ')[0]}"):
        # Refused at start-up: one clear line, exit status 2, nothing run.
        env = service_env(server.url, tmp_path / "state", 1.0, POSTDEPLOY_REPO=repo,
                          POSTDEPLOY_APP="shop")
        done = subprocess.run([sys.executable, "-m", "worker"], env=env, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
        assert "could run commands" in done.stderr or "command-line option" in done.stderr
        # Defence in depth: the git layer refuses it too if config checks were bypassed.
        source = AppSource(AppConfig("shop", repo=repo, branch="main"), tmp_path / "state")
        with pytest.raises(GitError):
            source.current_sha()
        assert not marker.exists()
        assert redis.Redis.from_url(server.url).dbsize() == 0

