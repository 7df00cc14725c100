"""The user guide's four example jobs, word for word, under a real `postdeploy up`.

Seeding through $DATABASE_URL (the local PostgreSQL), warming localhost:8080, the
notification with `git rev-parse HEAD` / `git log -1`, and `pm2 start` of two
workers that stay online after `up` stops and show in the app user's `pm2 list`;
once with the executor as root (the job runs as the app's user) and once with the
executor running as the app's user itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from tests.support.clirun import cli_env, interrupt, wait_succeeded
from tests.support.core import GitRemote, Service, appspec_yaml, wait_for

USER = "pdtest-shop"
DATABASE = "postgres://postgres@127.0.0.1:5432"  # this machine's PostgreSQL, trust auth

# The guide's examples, as written there.
SEED = """#!/usr/bin/env bash
set -euo pipefail

echo "[POST-DEPLOY] Seeding database..."

# Check if data already exists
if [ "$(psql $DATABASE_URL -tAc 'SELECT COUNT(*) FROM users')" -eq 0 ]; then
    echo "[POST-DEPLOY] Database empty, seeding..."
    npx prisma db seed
else
    echo "[POST-DEPLOY] Data exists, skipping seed"
fi

echo "[POST-DEPLOY] ✓ Seeding complete"
"""
WARM = """#!/usr/bin/env bash
set -euo pipefail

echo "[POST-DEPLOY] Warming cache..."

# Fetch and cache common queries
curl -s http://localhost:8080/api/products > /dev/null
curl -s http://localhost:8080/api/categories > /dev/null

echo "[POST-DEPLOY] ✓ Cache warmed"
"""
NOTIFY = """#!/usr/bin/env bash
set -euo pipefail

echo "[POST-DEPLOY] Sending notifications..."

# Get current commit info
COMMIT_SHA=$(git rev-parse HEAD)
COMMIT_MSG=$(git log -1 --pretty=%B)

# Send to Slack, Discord, etc.
curl -X POST "$WEBHOOK_URL" \\
  -H "Content-Type: application/json" \\
  -d "{\\"text\\": \\"Deployed: $COMMIT_MSG ($COMMIT_SHA)\\"}"

echo "[POST-DEPLOY] ✓ Notification sent"
"""
WORKERS = """#!/usr/bin/env bash
set -euo pipefail

echo "[POST-DEPLOY] Starting background workers..."

# Start worker processes
pm2 start worker.js --name email-worker
pm2 start scheduler.js --name task-scheduler

echo "[POST-DEPLOY] ✓ Workers started"
"""
DAEMON_JS = "setInterval(() => {}, 1000);\n"


class AppServer(ThreadingHTTPServer):
    """The app at localhost:8080: counts cache-warming hits, keeps notifications."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        self.posts: list[bytes] = []
        super().__init__(("127.0.0.1", 8080), _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: AppServer

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.server.hits.append(self.path)
        self._answer()

    def do_POST(self) -> None:  # noqa: N802
        self.server.posts.append(self.rfile.read(int(self.headers["Content-Length"])))
        self._answer()

    def _answer(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def app_server() -> Iterator[AppServer]:
    def bind() -> AppServer | None:
        try:
            return AppServer()
        except OSError:
            return None  # another test run holds 8080 for a moment
    try:
        server = wait_for(bind, 60, 0.5, what="port 8080 to be free")
    except AssertionError:
        pytest.skip("localhost:8080 stays in use on this machine")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def database() -> Iterator[str]:
    """A database of its own whose users table already has a row (the guide's skip path)."""
    if shutil.which("psql") is None:
        pytest.skip("psql is not installed")
    name = f"pdtest_{uuid.uuid4().hex[:12]}"
    made = subprocess.run(["psql", f"{DATABASE}/postgres", "-c", f"CREATE DATABASE {name}"],
                          capture_output=True, text=True, timeout=60)
    if made.returncode != 0:
        pytest.skip(f"no PostgreSQL at {DATABASE}: {made.stderr.strip()}")
    url = f"{DATABASE}/{name}"
    subprocess.run(["psql", url, "-c", "CREATE TABLE users (name text); "
                    "INSERT INTO users VALUES ('ada')"], check=True, capture_output=True)
    yield url
    subprocess.run(["psql", f"{DATABASE}/postgres", "-c", f"DROP DATABASE {name}"],
                   capture_output=True, timeout=60)


def pm2(*args: str) -> str:
    """`pm2 ARGS` as the app's user, in a login shell (their own HOME and PATH)."""
    return subprocess.run(["su", "-", USER, "-c", " ".join(["pm2", *args])],
                          capture_output=True, text=True, timeout=120).stdout


@pytest.fixture
def pm2_installed() -> Iterator[None]:
    if shutil.which("pm2") is None:  # CI installs it (.ci/run); elsewhere, once, here
        subprocess.run(["npm", "install", "-g", "pm2"], capture_output=True, timeout=600)
    if shutil.which("pm2") is None:
        pytest.skip("pm2 is not installed and npm could not install it")
    pm2("kill")
    yield
    pm2("kill")


@pytest.mark.parametrize("executor", ["root", "app user"])
def test_the_guides_four_examples_work_as_written(
        tmp_path: Path, executor: str, app_users: tuple[str, ...], app_server: AppServer,
        database: str, pm2_installed: None) -> None:
    remote = GitRemote(tmp_path / "git", "shop")
    folder = "scripts/post-deploy"
    sha = remote.commit({
        "appspec.yaml": appspec_yaml(
            "bash seed.sh && bash warm.sh && bash notify.sh && bash workers.sh",
            folder=folder, envs={"DATABASE_URL": database,
                                 "WEBHOOK_URL": "http://localhost:8080/hook"}),
        f"{folder}/seed.sh": SEED, f"{folder}/warm.sh": WARM,
        f"{folder}/notify.sh": NOTIFY, f"{folder}/workers.sh": WORKERS,
        f"{folder}/worker.js": DAEMON_JS, f"{folder}/scheduler.js": DAEMON_JS,
    }, "Add the post-deploy jobs")
    config = tmp_path / "postdeploy.yaml"
    config.write_text(yaml.safe_dump({"check_interval": 1, "apps": [
        {"name": "shop", "repo": remote.url, "user": USER}]}))
    state_dir = tmp_path / "state"
    entry = pwd.getpwnam(USER)
    prefix: list[str] = []
    env = cli_env()
    if executor == "app user":
        # The app's user runs everything: its repo and state are its own.
        subprocess.run(["chown", "-R", f"{USER}:{USER}", str(tmp_path / "git")], check=True)
        prefix = ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}",
                  "--init-groups", "--"]
        # As `up` starts its children: from Python, through this interpreter's path.
        spawn = ("import subprocess, sys; subprocess.run([sys.executable, '-c', "
                 "'import postdeploy.cli'], check=True)")
        probe = subprocess.run([*prefix, sys.executable, "-c", spawn], capture_output=True,
                               text=True, env=env, timeout=60)
        if probe.returncode != 0:
            pytest.skip(f"this Python cannot run as {USER} (its interpreter or packages "
                        f"are private to root): {probe.stderr.strip().splitlines()[-1:]}")
        env.update({"HOME": entry.pw_dir, "USER": USER, "LOGNAME": USER})
    up = Service(["-m", "postdeploy.cli", "up", "--config", str(config), "--state-dir",
                  str(state_dir)], env, tmp_path / "up.log", cwd=tmp_path, prefix=prefix)
    try:
        run = wait_succeeded(state_dir, timeout=120)
        assert run["sha"] == sha
        logs = subprocess.run(
            [sys.executable, "-m", "postdeploy.cli", "--state-dir", str(state_dir), "logs", "shop"],
            capture_output=True, text=True, env=cli_env(), timeout=60).stdout
        for line in ("Data exists, skipping seed", "✓ Seeding complete", "✓ Cache warmed",
                     "✓ Notification sent", "✓ Workers started"):
            assert f"[POST-DEPLOY] {line}" in logs, logs
        assert app_server.hits == ["/api/products", "/api/categories"]
        assert [json.loads(p) for p in app_server.posts] == [
            {"text": f"Deployed: Add the post-deploy jobs ({sha})"}]
        online = _online(pm2("jlist"))
        assert online == {"email-worker", "task-scheduler"}
        assert interrupt(up, 60) == 0
        # The workers are the app's: they outlive `up`, in the app user's own pm2.
        assert _online(pm2("jlist")) == online
        assert Path(entry.pw_dir, ".pm2").is_dir()
    finally:
        with contextlib.suppress(Exception):
            up.stop()


def _online(jlist: str) -> set[str]:
    start = jlist.find("[")
    if start < 0:
        return set()
    return {p["name"] for p in json.loads(jlist[start:])
            if p.get("pm2_env", {}).get("status") == "online"}


if os.geteuid() != 0:
    pytestmark = pytest.mark.skip(reason="runs the jobs as real users: needs root")
