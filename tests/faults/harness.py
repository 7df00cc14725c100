"""Real faults for the fault suite: a git HTTP server that can refuse or vanish,
memory sampling of a worker, a full scan of Redis, and the audit of a run history.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import redis

from postdeploy.run.runner import job_processes
from postdeploy.store.records import RunRecord
from tests.support.core import GitRemote, Service, free_port, run_git, runs, wait_for

# A run that executed the job to its end (a `lost` attempt did not; `error` ran nothing).
EXECUTED = ("succeeded", "failed", "timed_out")
COMPLETED = (*EXECUTED, "error")


# -- the run history ----------------------------------------------------------
@dataclass
class Audit:
    """What a history shows: commits never completed, and extra completed runs of a
    deployment."""

    lost: int
    duplicated: int
    detail: str


def audit(client: redis.Redis, app: str, expected: Iterable[str]) -> Audit:
    """``expected`` commits must each have a completed automatic run, and each
    deployment exactly one (a rollback is a deployment of its own)."""
    history = runs(client, app)
    lost = [s for s in expected if not any(r.sha == s and r.status in COMPLETED
                                           for r in history)]
    per_deployment: dict[object, int] = {}
    for record in history:
        if record.trigger == "auto" and record.status in COMPLETED:
            key = record.deployment if record.deployment is not None else record.sha
            per_deployment[key] = per_deployment.get(key, 0) + 1
    duplicated = sum(n - 1 for n in per_deployment.values() if n > 1)
    detail = ", ".join(f"{r.sha[:7]}:{r.status}" for r in history)
    return Audit(len(lost), duplicated, detail)


def overlapping(records: Iterable[RunRecord]) -> list[tuple[str, str]]:
    """Pairs of runs whose [started, finished] spans overlap (both executed something)."""
    spans = sorted((r.started_at, r.finished_at or time.time(), r.id) for r in records
                   if r.started_at is not None and r.status != "superseded")
    return [(a[2], b[2]) for a, b in zip(spans, spans[1:], strict=False) if b[0] < a[1]]


def journal_job(journal: Path, work: str) -> str:
    """A job command that logs ``start``/``end ID`` lines around ``work`` to ``journal``.

    The job holds an flock on ``journal.lock`` while any of its processes lives, so a
    second copy that starts before the first is wholly dead writes ``overlap ID``.
    """
    return (f'exec 9>>{journal}.lock; flock -n 9 || echo "overlap $POST_DEPLOY_RUN_ID" '
            f'>> {journal}; echo "start $POST_DEPLOY_RUN_ID" >> {journal}; {work}; '
            f'echo "end $POST_DEPLOY_RUN_ID" >> {journal}')


def journal_lines(journal: Path, kind: str) -> list[str]:
    """Run ids of the journal's ``kind`` lines (start, end or overlap)."""
    if not journal.exists():
        return []
    return [line.split(" ", 1)[1] for line in journal.read_text().splitlines()
            if line.startswith(kind + " ")]


# -- processes ------------------------------------------------------------------
def crash_host(worker: Service, run_ids: Iterable[str]) -> None:
    """What a host crash does: SIGKILL the worker's whole group and every job process."""
    try:
        os.killpg(worker.proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for run_id in run_ids:
        for pid in job_processes(run_id):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    worker.proc.wait(10)
    wait_for(lambda: not any(job_processes(r) for r in run_ids), 10,
             what="the job's processes to die")


def worker_ready(worker: Service) -> bool:
    return " ready." in worker.log()


# -- Celery -----------------------------------------------------------------------
_SEND_RUN_JOB = """
import json, sys
from postdeploy.store import celery_app
from postdeploy.services import tasks
from postdeploy.config.settings import AppConfig, Settings
url, repo, kwargs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
celery_app.configure(Settings(apps=(AppConfig("shop", repo=repo),)), url)
result = tasks.run_job.apply_async(kwargs=kwargs)
result.get(timeout=60, propagate=False)
print(json.dumps({"state": result.state, "result": str(result.result)}))
"""


def send_run_job(redis_url: str, repo: str, **kwargs: str) -> dict[str, str]:
    """Send postdeploy.run_job through Celery, as Flower or a script would; its outcome.

    A fresh process each time: Celery caches its broker and backend connections, and
    each test has its own Redis.
    """
    done = subprocess.run([sys.executable, "-c", _SEND_RUN_JOB, redis_url, repo,
                           json.dumps(kwargs)], capture_output=True, text=True, timeout=120,
                          check=True)
    outcome: dict[str, str] = json.loads(done.stdout.strip().splitlines()[-1])
    return outcome


# -- Redis ------------------------------------------------------------------------
def dump_redis(client: redis.Redis) -> Iterator[tuple[bytes, bytes]]:
    """Every key with every value it holds, whatever its type (SCAN, no KEYS)."""
    for key in client.scan_iter(count=500):
        kind = client.type(key)
        values: list[bytes] = []
        if kind == b"string":
            values = [client.get(key) or b""]
        elif kind == b"hash":
            for k, v in client.hgetall(key).items():
                values += [k, v]
        elif kind == b"list":
            values = list(client.lrange(key, 0, -1))
        elif kind == b"set":
            values = list(client.smembers(key))
        elif kind == b"zset":
            values = [m for m, _ in client.zrange(key, 0, -1, withscores=True)]
        elif kind == b"stream":
            for _, entry in client.xrange(key):
                for k, v in entry.items():
                    values += [k, v]
        yield key, b"\n".join(values)


def leaks(texts: Mapping[str, bytes | str], secrets: Iterable[str]) -> list[str]:
    """Places (by name) where any secret appears, also base64-encoded (Celery bodies)."""
    found = []
    for secret in secrets:
        forms = {secret.encode(), base64.b64encode(secret.encode())}
        for name, text in texts.items():
            data = text.encode() if isinstance(text, str) else text
            if any(form in data for form in forms):
                found.append(f"{secret[:4]}... in {name}")
    return found


# -- git over HTTP ---------------------------------------------------------------
class GitHttpServer:
    """Serves bare repositories over git's "dumb" HTTP protocol, with basic auth.

    ``accept`` holds the credentials that are let in; anything else gets 401.
    The server can be started late (a host that was unreachable comes back).
    """

    def __init__(self, root: Path, port: int | None = None,
                 accept: tuple[str, str] | None = None) -> None:
        self.root = root
        self.port = port or free_port()
        self.accept = accept
        self.requests = 0
        self._server: ThreadingHTTPServer | None = None

    def url(self, repo: str, user: str | None = None, token: str | None = None) -> str:
        auth = f"{user}:{token}@" if user else ""
        return f"http://{auth}127.0.0.1:{self.port}/{repo}"

    def start(self) -> GitHttpServer:
        owner = self

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                owner.requests += 1
                if owner.accept is not None:
                    token = base64.b64encode(":".join(owner.accept).encode()).decode()
                    if self.headers.get("Authorization") != f"Basic {token}":
                        self.send_response(401)
                        self.send_header("WWW-Authenticate", 'Basic realm="git"')
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                super().do_GET()

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        handler = partial(Handler, directory=str(self.root))
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def serve_dumb(remote: GitRemote) -> None:
    """Let dumb HTTP clients read ``remote``'s bare repo (now and after every push)."""
    hook = remote.bare / "hooks" / "post-update"
    hook.write_text("#!/bin/sh\nexec git update-server-info\n")
    hook.chmod(0o755)
    run_git(remote.bare, "update-server-info")
