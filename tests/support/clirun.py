"""Running the real `postdeploy` CLI and `postdeploy up` as subprocesses in tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil

from tests.support.core import GitRemote, Service, process_alive, wait_for

JOB_SCRIPT = 'echo "[POST-DEPLOY] hello from $POST_DEPLOY_TRIGGER run"\n'


def cli_env(**extra: str) -> dict[str, str]:
    """Our environment without any POSTDEPLOY_* setting of the machine running the tests."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTDEPLOY_")}
    env.update({"PYTHONUNBUFFERED": "1", "POSTDEPLOY_KILL_GRACE": "2"})
    env.update(extra)
    return env


def cli(state_dir: Path, *args: str, cwd: Path | None = None, timeout: float = 90,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`postdeploy --state-dir STATE ARGS...`, waited for, output captured."""
    return subprocess.run([sys.executable, "-m", "postdeploy.cli", "--state-dir",
                           str(state_dir), *args], cwd=cwd or state_dir.parent,
                          env=env or cli_env(), capture_output=True, text=True,
                          timeout=timeout)


def status_json(state_dir: Path) -> dict[str, Any]:
    result = cli(state_dir, "status", "--json")
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def latest_run(state_dir: Path, app: str = "shop") -> dict[str, Any] | None:
    for row in status_json(state_dir)["apps"]:
        if row["app"] == app:
            run: dict[str, Any] | None = row["latest_run"]
            return run
    return None


def start_up(root: Path, remote: GitRemote, state_dir: Path, name: str = "up",
             **extra_env: str) -> Service:
    """A real `postdeploy up` on the embedded Redis, checking every second."""
    state_dir.parent.mkdir(parents=True, exist_ok=True)
    return Service(["-m", "postdeploy.cli", "up", "--repo", remote.url, "--name", "shop",
                    "--interval", "1", "--state-dir", str(state_dir)],
                   cli_env(**extra_env), root / f"{name}.log", cwd=root)


def wait_succeeded(state_dir: Path, count: int = 1, timeout: float = 60) -> dict[str, Any]:
    """Wait until the app has ``count`` succeeded runs; return the latest run."""
    def done() -> dict[str, Any] | None:
        if not (state_dir / "redis.url").exists():
            return None
        result = cli(state_dir, "history", "shop", "--json")
        if result.returncode != 0:
            return None
        runs = json.loads(result.stdout)["runs"]
        good = [r for r in runs if r["status"] == "succeeded"]
        return good[0] if len(good) >= count else None
    found: dict[str, Any] = wait_for(done, timeout, 0.5, what=f"{count} succeeded run(s)")
    return found


def family(pid: int) -> list[int]:
    """``pid`` and all its descendants now."""
    try:
        return [pid, *(p.pid for p in psutil.Process(pid).children(recursive=True))]
    except psutil.Error:
        return [pid]


def marker_of(pids: list[int]) -> str | None:
    """The POST_DEPLOY_UP_ID that `up` gave its children."""
    for pid in pids:
        try:
            value = psutil.Process(pid).environ().get("POST_DEPLOY_UP_ID")
        except psutil.Error:
            continue
        if value:
            return value
    return None


def interrupt(service: Service, timeout: float = 20) -> int:
    """Ctrl-C for a background `up`: SIGINT, then wait for it to end."""
    service.proc.send_signal(signal.SIGINT)
    code = service.proc.wait(timeout)
    service.stop()
    return code


def all_dead(pids: list[int]) -> bool:
    return not any(process_alive(pid) for pid in pids)
