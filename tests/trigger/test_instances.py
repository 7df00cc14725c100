"""Instances: each host's worker reports its commit and readiness; gone when silent."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from postdeploy.config.settings import Settings
from postdeploy.errors import ConfigError
from tests.support.clirun import cli, cli_env
from tests.support.core import GitRemote, appspec_yaml, service_env, wait_for
from tests.support.hosts import Fleet

GATED = appspec_yaml("echo hi", envs={
    "POST_DEPLOY_WAIT_URL": "http://127.0.0.1:${APP_PORT}/health",
    "POST_DEPLOY_WAIT_FOR_COMMIT": "true"})


def instances(fleet: Fleet, tmp_path: Path) -> dict[str, dict[str, Any]]:
    result = cli(tmp_path / "cli-state", "status", "--json",
                 env=cli_env(POSTDEPLOY_REDIS_URL=fleet.redis_url))
    assert result.returncode == 0, result.stderr
    apps = {row["app"]: row for row in json.loads(result.stdout)["apps"]}
    return {i["host"]: i for i in apps.get("shop", {}).get("instances", [])}


def test_each_host_reports_its_commit_and_readiness(
        fleet: Fleet, remote: GitRemote, tmp_path: Path) -> None:
    c1 = remote.commit({"appspec.yaml": GATED}, "first")
    a, b = fleet.add("host-a"), fleet.add("host-b")
    a.start(), b.start()
    both = wait_for(lambda: len(seen := instances(fleet, tmp_path)) == 2 and
                    all(i["ready"] for i in seen.values()) and seen, 30,
                    what="two ready instances")
    assert {h: (i["sha"], i["ready"]) for h, i in both.items()} == {
        "host-a": (c1, True), "host-b": (c1, True)}
    assert set(both["host-a"]) == {"host", "sha", "ready", "seen_at"}

    # host-b pulls C2 but its app still serves C1: that instance is not ready.
    c2 = remote.commit({"appspec.yaml": GATED, "v": "2"}, "second")
    b.pull()
    moved = wait_for(lambda: (seen := instances(fleet, tmp_path))["host-b"]["sha"] == c2
                     and seen["host-b"]["ready"] is False and seen, 20,
                     what="host-b at C2, not ready")
    assert (moved["host-a"]["sha"], moved["host-a"]["ready"]) == (c1, True)
    b.serve()
    wait_for(lambda: instances(fleet, tmp_path)["host-b"]["ready"] is True, 20,
             what="host-b ready once its app serves C2")

    table = cli(tmp_path / "cli-state", "status",
                env=cli_env(POSTDEPLOY_REDIS_URL=fleet.redis_url)).stdout
    rows = [line.split() for line in table.splitlines()]
    assert ["shop@host-b", c2[:7], "yes"] == next(r for r in rows if r[:1] == ["shop@host-b"])[:3]

    # A host that stops reporting is gone after three intervals.
    b.power_off()
    wait_for(lambda: set(instances(fleet, tmp_path)) == {"host-a"}, 15,
             what="host-b gone")


def test_host_and_boot_id_settings(tmp_path: Path, redis_url: str) -> None:
    settings = Settings.load({})
    assert settings.host == socket.gethostname()
    assert settings.boot_id == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert Settings.load({"POSTDEPLOY_HOST": "web-1", "POSTDEPLOY_BOOT_ID": "b2"}).host == (
        "web-1")
    with pytest.raises(ConfigError, match="invalid POSTDEPLOY_HOST: 'web 1'"):
        Settings.load({"POSTDEPLOY_HOST": "web 1"})
    # A worker refuses it with one line, before starting anything.
    env = service_env(redis_url, tmp_path / "state", POSTDEPLOY_HOST="../x",
                      POSTDEPLOY_REPO=str(tmp_path))
    result = subprocess.run([sys.executable, "-m", "worker"], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().endswith("invalid POSTDEPLOY_HOST: '../x'; use letters, "
                                          "digits, '.', '_' and '-' (it names the host's "
                                          "queue)")
    assert result.stderr.count("\n") == 1
