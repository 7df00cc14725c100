"""A stand-in for GitHub's, GitLab's and Gitea's commit status APIs, in the test process.

It accepts only requests of the documented shape ("create a commit status":
method, path, auth header, JSON fields and state values of each provider) and
keeps each accepted status; anything else is answered 4xx and kept as a
complaint, so a test sees what was wrong. ``dribble`` answers one byte every
half second, for the total-deadline test.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.support.core import wait_for

# provider -> (path pattern, auth header, auth value prefix, name of the context field,
#              accepted states); from each provider's REST API documentation.
SHAPES: dict[str, tuple[re.Pattern[str], str, str, str, frozenset[str]]] = {
    "github": (re.compile(r"^/repos/[^/]+/[^/]+/statuses/[0-9a-f]{40}$"), "Authorization",
               "Bearer ", "context", frozenset({"error", "failure", "pending", "success"})),
    "gitea": (re.compile(r"^/api/v1/repos/[^/]+/[^/]+/statuses/[0-9a-f]{40}$"),
              "Authorization", "token ", "context",
              frozenset({"pending", "success", "error", "failure", "warning"})),
    "gitlab": (re.compile(r"^/api/v4/projects/[^/]+/statuses/[0-9a-f]{40}$"),
               "PRIVATE-TOKEN", "", "name",
               frozenset({"pending", "running", "success", "failed", "canceled", "skipped"})),
}


@dataclass(frozen=True)
class Received:
    provider: str
    path: str
    state: str
    context: str
    description: str


class GitHostStandIn:
    def __init__(self, provider: str, token: str, mode: str = "ok") -> None:
        self.provider, self.token, self.mode = provider, token, mode
        self.statuses: list[Received] = []
        self.complaints: list[str] = []
        self.requests = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                owner.requests += 1
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if owner.mode == "dribble":
                    owner._dribble(self)
                    return
                code, complaint = owner.check(self.path, dict(self.headers), body)
                if complaint:
                    owner.complaints.append(complaint)
                self.send_response(code)
                answer = b'{"id": 1}' if code == 201 else json.dumps(
                    {"message": complaint}).encode()
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def api_url(self) -> str:
        base = f"http://127.0.0.1:{self.port}"
        return {"github": base, "gitea": f"{base}/api/v1", "gitlab": f"{base}/api/v4"}[
            self.provider]

    def check(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, str]:
        pattern, auth_header, auth_prefix, context_field, states = SHAPES[self.provider]
        if not pattern.match(path):
            return 404, f"unknown path {path}"
        if headers.get(auth_header) != auth_prefix + self.token:
            return 401, f"bad {auth_header} header: {headers.get(auth_header)!r}"
        if "json" not in headers.get("Content-Type", ""):
            return 415, "not JSON"
        try:
            data = json.loads(body)
        except ValueError:
            return 400, "body is not JSON"
        if not isinstance(data, dict) or data.get("state") not in states:
            return 422, f"bad state in {data!r}"
        context = data.get(context_field)
        if not isinstance(context, str) or not context:
            return 422, f"no {context_field} in {data!r}"
        description = data.get("description", "")
        if self.provider == "github" and len(description) > 140:
            return 422, "description over 140 characters"
        self.statuses.append(Received(self.provider, path, data["state"], context,
                                      description))
        return 201, ""

    def _dribble(self, handler: BaseHTTPRequestHandler) -> None:
        try:
            handler.wfile.write(b"HTTP/1.1 201 Created\r\n")
            for _ in range(120):
                handler.wfile.write(b"X")
                handler.wfile.flush()
                time.sleep(0.5)
        except OSError:
            pass  # the client gave up, as it should

    def wait(self, count: int, timeout: float = 40) -> list[Received]:
        return wait_for(lambda: self.statuses if len(self.statuses) >= count else None,
                        timeout, 0.1, what=f"{count} commit status(es) at the {self.provider} "
                                           f"stand-in (complaints: {self.complaints})")

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
