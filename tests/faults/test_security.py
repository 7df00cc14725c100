"""Security under real traffic: a pickle message on the queue is refused, and secrets
(SECRET values, the Redis password, repo URL tokens) appear nowhere they could leak.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from celery import Celery

from postdeploy.store import keys
from postdeploy.store.celery_app import QUEUE
from tests.faults.conftest import Executor, FaultScope
from tests.faults.harness import (
    GitHttpServer,
    dump_redis,
    leaks,
    send_run_job,
    serve_dumb,
)
from tests.support.core import (
    GitRemote,
    appspec_yaml,
    runs,
    wait_for,
)

REDIS_PASSWORD = "redis-pw-8c1d5e27"
REPO_TOKEN = "repo-token-3fa9b1"
DB_SECRET = "db-secret-77e2c4"


class Exploit:
    """Unpickling this runs ``touch`` on the marker: what a pickle message could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def succeeded(client: object, sha: str) -> Callable[[], bool]:
    return lambda: any(r.sha == sha and r.status == "succeeded"
                       for r in runs(client, "shop"))  # type: ignore[arg-type]


def test_pickle_message_is_refused(tmp_path: Path, remote: GitRemote,
                                   executor: Callable[..., Executor],
                                   fault: FaultScope) -> None:
    started = executor(wait_ready=True)
    server, client, worker = started.server, started.client, started.worker
    marker = tmp_path / "pwned"

    with fault("pickle message on the job queue"):
        attacker = Celery("attacker", broker=server.url)
        attacker.conf.broker_transport_options = {"global_keyprefix": keys.CELERY_PREFIX}
        attacker.send_task("postdeploy.run_job", args=[Exploit(marker)], queue=QUEUE,
                           serializer="pickle")
        wait_for(lambda: "pickle" in worker.log() and "untrusted" in worker.log(), 30,
                 what="the worker to refuse the pickle message")
        assert not marker.exists()
        assert worker.alive()
        sha = remote.commit({"appspec.yaml": appspec_yaml("echo after-pickle")})
        wait_for(succeeded(client, sha), 40, what="a normal job after the pickle message")


def test_secrets_never_leak(tmp_path: Path, remote: GitRemote,
                            executor: Callable[..., Executor], fault: FaultScope) -> None:
    serve_dumb(remote)
    http = GitHttpServer(tmp_path / "git", accept=("deploy", REPO_TOKEN)).start()
    envdump = tmp_path / "job-env"
    job = appspec_yaml(f'echo "db is $DATABASE_URL"; env > {envdump}',
                       envs={"GREETING": "hello"},
                       secrets={"DATABASE_URL": f"postgres://app:{DB_SECRET}@db/app"})
    sha = remote.commit({"appspec.yaml": job})
    repo_url = http.url("shop.git", "deploy", REPO_TOKEN)
    started = executor(password=REDIS_PASSWORD, repo=repo_url, POSTDEPLOY_BRANCH="main")
    server, client, env = started.server, started.client, started.env
    worker, beat = started.worker, started.beat
    try:
        with fault("secrets in logs, status, history, Redis, task args and results"):
            wait_for(succeeded(client, sha), 60, what="the automatic run")
            # A manual run too, so Celery stores task arguments and a result.
            outcome = send_run_job(server.url, repo_url, app="shop", trigger="manual")
            assert outcome["state"] == "SUCCESS", outcome
            # A failing check as well: git errors carry the URL.
            http.accept = ("deploy", "rotated")
            wait_for(lambda: "commit check of shop failed" in worker.log(), 30,
                     what="a failed check")

            job_env = dict(line.split("=", 1) for line in envdump.read_text().splitlines()
                           if "=" in line)
            assert job_env["DATABASE_URL"] == f"postgres://app:{DB_SECRET}@db/app"
            assert job_env["GREETING"] == "hello"
            assert not any(k.startswith("POSTDEPLOY_") for k in job_env)
            texts: dict[str, bytes | str] = {
                f"redis {key.decode(errors='replace')}": value
                for key, value in dump_redis(client)}
            texts.update({f"redis key {key.decode(errors='replace')}": key
                          for key in client.scan_iter()})
            texts["worker log"] = worker.log()
            texts["beat log"] = beat.log()
            texts["job environment"] = "\n".join(
                f"{k}={v}" for k, v in job_env.items() if k != "DATABASE_URL")
            cli_env = {**env, "POSTDEPLOY_REPO": ""}
            for command in (["status", "--json"], ["history", "shop", "--json"],
                            ["logs", "shop"]):
                done = subprocess.run([sys.executable, "-m", "postdeploy.cli", *command],
                                      env=cli_env, capture_output=True, text=True, timeout=60)
                assert done.returncode == 0, (command, done.stderr)
                texts[f"postdeploy {' '.join(command)}"] = done.stdout + done.stderr
            assert "db is ***" in texts["postdeploy logs shop"]
            assert len(texts) > 10
            assert leaks(texts, [REDIS_PASSWORD, REPO_TOKEN, DB_SECRET]) == []
    finally:
        http.stop()
