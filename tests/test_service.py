"""`python -m worker` and `python -m beat`: a bad setting stops start-up with one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import service_env


@pytest.mark.parametrize("module", ["worker", "beat"])
@pytest.mark.parametrize("extra, message", [
    ({"POSTDEPLOY_CHECK_INTERVAL": "abc"},
     "invalid POSTDEPLOY_CHECK_INTERVAL: 'abc' is not a positive number of seconds"),
    ({"POSTDEPLOY_REPO": ""}, "no apps to watch; set POSTDEPLOY_REPO"),
    ({"POSTDEPLOY_REDIS_URL": "mysql://root:hunter2@db/0"},
     "invalid POSTDEPLOY_REDIS_URL: 'mysql://***@db/0'"),
])
def test_bad_setting_is_one_line_and_exit_2(module: str, extra: dict[str, str], message: str,
                                            tmp_path: Path, redis_url: str) -> None:
    env = service_env(redis_url, tmp_path / "state", POSTDEPLOY_REPO=str(tmp_path / "x.git"))
    env.update(extra)
    done = subprocess.run([sys.executable, "-m", module], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("postdeploy: error: ") and message in line, line
    assert "hunter2" not in done.stderr
