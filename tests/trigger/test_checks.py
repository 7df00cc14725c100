"""The commit check on real git and Redis: reconciliation, and failures reported sparingly."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import redis

from postdeploy.config.settings import AppConfig, Settings
from postdeploy.store.state import StateStore
from postdeploy.trigger.check import reconcile
from tests.support.core import GitRemote, appspec_yaml

Enqueued = list[tuple[str, str, str, str, int]]


def checker(tmp_path: Path, client: redis.Redis, repo: str):  # type: ignore[no-untyped-def]
    settings = Settings.load({"POSTDEPLOY_STATE_DIR": str(tmp_path / "state")})
    store, app, queued = StateStore(client), AppConfig(name="shop", repo=repo), []

    def check():  # type: ignore[no-untyped-def]
        return reconcile(settings, store, app, lambda *args: queued.append(args))
    return check, store, queued


def test_new_commit_is_enqueued_once_with_its_timeout(
        tmp_path: Path, rclient: redis.Redis, remote: GitRemote) -> None:
    sha = remote.commit({"appspec.yaml": appspec_yaml("true", timeout="42")})
    check, _, queued = checker(tmp_path, rclient, remote.url)
    assert check().action == "enqueued"
    assert check().action == "unchanged"
    (app, queued_sha, trigger, _, timeout), = queued
    assert (app, queued_sha, trigger, timeout) == ("shop", sha, "auto", 42)


def test_commit_without_command_is_said_once(tmp_path: Path, rclient: redis.Redis,
                                             remote: GitRemote,
                                             caplog: pytest.LogCaptureFixture) -> None:
    remote.commit({"appspec.yaml": appspec_yaml(timeout="10")})
    check, _, queued = checker(tmp_path, rclient, remote.url)
    with caplog.at_level(logging.INFO, "postdeploy"):
        assert [check().action for _ in range(3)] == ["no-command", "unchanged", "unchanged"]
    assert [r.message for r in caplog.records].count(
        "shop@" + remote.head()[:7] + ": POST_DEPLOY_COMMAND is not set; no job to run") == 1
    assert queued == []


def test_failing_check_warns_once_then_recovers(tmp_path: Path, rclient: redis.Redis,
                                                remote: GitRemote,
                                                caplog: pytest.LogCaptureFixture) -> None:
    remote.commit({"appspec.yaml": appspec_yaml("true")})
    moved = remote.bare.with_name("moved.git")
    shutil.move(remote.bare, moved)
    check, store, queued = checker(tmp_path, rclient, remote.url)
    with caplog.at_level(logging.INFO, "postdeploy"):
        assert [check().action for _ in range(3)] == ["error"] * 3
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "commit check of shop failed" in warnings[0].message
        failure = store.check_failure("shop")
        assert failure and failure["count"] == 3 and remote.url in failure["error"]
        shutil.move(moved, remote.bare)
        assert check().action == "enqueued"
    assert "commit check of shop works again after 3 failed check(s)" in caplog.text
    assert store.check_failure("shop") is None and len(queued) == 1
