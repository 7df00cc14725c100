"""Every entry point (worker, beat, up, flower, metrics, a CLI command) stops a bad
setting at start-up with one line, `postdeploy: error: ...`, and exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.core import free_port, service_env

ENTRY_POINTS = {
    "worker": ["-m", "worker"],
    "beat": ["-m", "beat"],
    "up": ["-m", "postdeploy.cli", "up"],
    "status": ["-m", "postdeploy.cli", "status"],
    "flower": ["-m", "postdeploy.cli", "flower"],
    "metrics": ["-m", "postdeploy.cli", "metrics"],
}
A_FILE = "not-a-dir"  # created in tmp_path by the test
BAD_SETTINGS = [
    ({"POSTDEPLOY_CHECK_INTERVAL": "abc"},
     "invalid POSTDEPLOY_CHECK_INTERVAL: 'abc' is not a positive number of seconds"),
    ({"POSTDEPLOY_CHECK_INTERVAL": "0.001"},
     "invalid POSTDEPLOY_CHECK_INTERVAL: '0.001' is out of range; use 1 to 604800 seconds"),
    ({"POSTDEPLOY_REDIS_URL": "redis://:hunter2@127.0.0.1:99999/0"},
     "invalid POSTDEPLOY_REDIS_URL: 'redis://***@127.0.0.1:99999/0' has a port that is "
     "not a TCP port (1-65535)"),
    ({"POSTDEPLOY_REDIS_URL": "redis://:hunter2@127.0.0.1:6379/x"},
     "invalid POSTDEPLOY_REDIS_URL: 'redis://***@127.0.0.1:6379/x' has db 'x', which is "
     "not a number"),
    ({"POSTDEPLOY_REDIS_URL": "mysql://root:hunter2@db/0"},
     "invalid POSTDEPLOY_REDIS_URL: 'mysql://***@db/0'; expected redis://host:port/db"),
    ({"POSTDEPLOY_STATE_DIR": A_FILE}, "is a file, not a directory"),
    ({"POSTDEPLOY_STATE_DIR": f"{A_FILE}/state"}, "is a file, not a directory"),
    ({"POSTDEPLOY_STATE_DIR": "s" * 300}, "cannot be used (File name too long)"),
    ({"POSTDEPLOY_APP": "shop.lock"}, "POSTDEPLOY_APP: 'shop.lock' is not a valid app name"),
    ({"POSTDEPLOY_APP": ".."}, "POSTDEPLOY_APP: '..' is not a valid app name"),
    ({"POSTDEPLOY_BRANCH": "--upload-pack=touch x"},
     "POSTDEPLOY_BRANCH: '--upload-pack=touch x' is not a valid branch name"),
    ({"POSTDEPLOY_CONCURRENCY": "100000"},
     "invalid POSTDEPLOY_CONCURRENCY: '100000' is out of range; use 1 to 256"),
    ({"POSTDEPLOY_OUTPUT_LIMIT": "1000000000"},
     "invalid POSTDEPLOY_OUTPUT_LIMIT: '1000000000' is out of range"),
    ({"POSTDEPLOY_LOG_LEVEL": "loud"}, "invalid POSTDEPLOY_LOG_LEVEL: 'loud'"),
]


def start(entry: str, env: dict[str, str], cwd: Path,
          *args: str) -> subprocess.CompletedProcess[str]:
    # A timeout here means the process started anyway: the setting got through.
    return subprocess.run([sys.executable, *ENTRY_POINTS[entry], *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, (done.returncode, done.stderr)
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("postdeploy: error: "), line
    assert "Traceback" not in done.stderr and "hunter2" not in done.stderr
    return line


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("extra, message", BAD_SETTINGS)
def test_bad_setting_is_one_line_and_exit_2(entry: str, extra: dict[str, str], message: str,
                                            tmp_path: Path, redis_url: str) -> None:
    (tmp_path / A_FILE).write_text("a file where a directory belongs\n")
    env = service_env(redis_url, tmp_path / "state", POSTDEPLOY_REPO=str(tmp_path / "x.git"))
    env.update(extra)
    line = one_error_line(start(entry, env, tmp_path))
    assert message in line, line


@pytest.mark.parametrize("entry", ["worker", "beat", "up"])
def test_no_apps_is_one_line_and_exit_2(entry: str, tmp_path: Path, redis_url: str) -> None:
    env = service_env(redis_url, tmp_path / "state")
    assert "no apps to watch" in one_error_line(start(entry, env, tmp_path))


@pytest.mark.parametrize("entry", ["worker", "beat", "up", "status"])
def test_app_names_that_clash_are_refused(entry: str, tmp_path: Path, redis_url: str) -> None:
    # `shop` and `Shop` would share one checkout on a case-insensitive disk.
    config = tmp_path / "postdeploy.yaml"
    config.write_text("apps:\n  - name: shop\n    repo: /srv/a.git\n"
                      "  - name: Shop\n    repo: /srv/b.git\n")
    env = service_env(redis_url, tmp_path / "state", POSTDEPLOY_CONFIG=str(config))
    line = one_error_line(start(entry, env, tmp_path))
    assert f"{config}: app 'Shop': name is used twice" in line, line


def test_up_interval_below_a_second_is_refused(tmp_path: Path, redis_url: str) -> None:
    env = service_env(redis_url, tmp_path / "state", POSTDEPLOY_REPO=str(tmp_path / "x.git"))
    line = one_error_line(start("up", env, tmp_path, "--interval", "0.001"))
    assert "invalid POSTDEPLOY_CHECK_INTERVAL (--interval): '0.001' is out of range; " \
        "use 1 to 604800 seconds" in line


@pytest.mark.parametrize("entry", ["worker", "up", "flower"])
def test_a_state_dir_that_cannot_be_made_is_one_line(entry: str, tmp_path: Path,
                                                     redis_url: str) -> None:
    # Below a symlink to a removed directory (an unmounted volume, say): not even
    # root can create it.
    (tmp_path / "volume").symlink_to(tmp_path / "removed")
    state = tmp_path / "volume" / "state"
    env = service_env(redis_url, state, POSTDEPLOY_REPO=str(tmp_path / "x.git"))
    line = one_error_line(start(entry, env, tmp_path))
    assert f"cannot create the state directory '{state}': a part of the path is a broken " \
        "symlink" in line, line


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to a read-only directory")
def test_a_read_only_state_dir_is_one_line(tmp_path: Path, redis_url: str) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o500)
    env = service_env(redis_url, state, POSTDEPLOY_REPO=str(tmp_path / "x.git"))
    line = one_error_line(start("worker", env, tmp_path))
    assert "cannot write to the state directory" in line and "Permission denied" in line


@pytest.mark.parametrize("entry", ["flower", "metrics"])
@pytest.mark.parametrize("args, message", [
    (["--port", "99999"], "invalid value for '--port': 99999 is not in the range"),
    (["--address", "no-such-host.invalid"], "cannot listen on no-such-host.invalid:"),
    (["--colour"], "no such option '--colour'"),
])
def test_bad_flag_is_one_line_and_exit_2(entry: str, args: list[str], message: str,
                                         tmp_path: Path, redis_url: str) -> None:
    env = service_env(redis_url, tmp_path / "state", FLOWER_BASIC_AUTH="ops:pw")
    if "--port" not in args:
        args = [*args, "--port", str(free_port())]
    line = one_error_line(start(entry, env, tmp_path, *args))
    assert message in line.lower(), line


@pytest.mark.parametrize("entry", ["flower", "metrics"])
def test_a_port_in_use_is_one_line(entry: str, tmp_path: Path, redis_url: str) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = service_env(redis_url, tmp_path / "state")
        line = one_error_line(start(entry, env, tmp_path, "--port", str(port)))
    assert f"cannot listen on 127.0.0.1:{port} (Address already in use)" in line, line


@pytest.mark.parametrize("entry", ["worker", "beat"])
def test_a_flag_celery_does_not_know_is_one_line(entry: str, tmp_path: Path,
                                                 redis_url: str) -> None:
    env = service_env(redis_url, tmp_path / "state", POSTDEPLOY_REPO=str(tmp_path / "x.git"))
    line = one_error_line(start(entry, env, tmp_path, "--bogus"))
    assert f"No such option '--bogus' (flags postdeploy does not know go to Celery; see " \
        f"`celery {entry} --help`)" in line, line
