"""The webhook's HTTP side: routes, size and type checks, JSON answers, on Tornado's server.

Tornado's HTTP/1.1 server (keep-alive, chunked bodies, ``Expect: 100-continue``,
body size and time limits) is used through its request-delegate interface
rather than ``tornado.web``: the service has two routes and JSON answers, and
the web framework's per-request machinery (handler objects, default headers,
output transforms) costs CPU, which is what bounds the answer time of a burst
of deliveries on one event loop. bench/webhook.py's row "tornado.web CPU per
request under that load" measures it: the same bare answer took 0.37-0.46 ms
of CPU per request through ``tornado.web``, 0.29-0.34 ms through the delegate
(1.22-1.34x; ``python -m bench --quick --only webhook --rounds 10``, 2 cores
shared with other work). This module rewritten on ``tornado.web``
(``stream_request_body``, ``prepare()``) answered 200 concurrent deliveries
14-38% later at the p99 than this one, measured alternately in the same runs.
The headers are seen before the body is read, so a body announced too large,
or of the wrong type, is refused unread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tornado import httputil
from tornado.iostream import StreamClosedError

from postdeploy.webhook.providers import PROVIDERS, Headers, HookRejected, Provider

log = logging.getLogger(__name__)

MAX_BODY = 1024 * 1024  # bytes; push payloads are far smaller
JSON_TYPE = "application/json"
HOOKS = "/hooks/"

# (provider, headers, apps named in the query, body, peer) -> (status, answer body)
Handle = Callable[[Provider, Headers, list[str], bytes, str],
                  Awaitable[tuple[int, dict[str, Any]]]]


class HookServer(httputil.HTTPServerConnectionDelegate):
    """Gives each request an :class:`Exchange`; counts the requests not yet answered."""

    def __init__(self, handle: Handle, apps: int) -> None:
        self.handle = handle
        self.apps = apps
        self.in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()  # keep running answers referenced

    def start_request(self, server_conn: object,
                      request_conn: httputil.HTTPConnection) -> httputil.HTTPMessageDelegate:
        return Exchange(self, request_conn)

    def spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self, timeout: float) -> None:
        """Wait (up to ``timeout``) for the requests in hand to be answered."""
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)


class Exchange(httputil.HTTPMessageDelegate):
    """One request and its answer."""

    def __init__(self, server: HookServer, connection: httputil.HTTPConnection) -> None:
        self.server = server
        self.connection = connection
        self.provider: Provider | None = None
        self.headers: httputil.HTTPHeaders = httputil.HTTPHeaders()
        self.query = ""
        self.chunks: list[bytes] = []
        self.size = 0
        self.answered = False
        self.closed = False
        self.started = time.monotonic()
        self.request_line = ""
        self.method = ""
        self.allow = "POST"  # the methods of the route asked for

    def headers_received(self, start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
                         headers: httputil.HTTPHeaders) -> None:
        assert isinstance(start_line, httputil.RequestStartLine)
        self.headers = headers
        self.method = start_line.method
        self.request_line = f"{start_line.method} {start_line.path}"
        try:
            self._route(start_line.method, start_line.path, headers)
        except HookRejected as exc:
            self.answer(exc.status, {"error": str(exc)},
                        {"Allow": self.allow} if exc.status == 405 else None)

    def _route(self, method: str, target: str, headers: httputil.HTTPHeaders) -> None:
        parts = urlsplit(target)
        path, self.query = parts.path, parts.query
        if path == "/healthz":
            self.allow = "GET, HEAD"
            if method not in ("GET", "HEAD"):
                raise HookRejected(405, "use GET /healthz")
            self.answer(200, {"status": "ok", "apps": self.server.apps})
            return
        name = path[len(HOOKS):].rstrip("/") if path.startswith(HOOKS) else None
        if name not in PROVIDERS:
            raise HookRejected(404, f"no endpoint {path[:60]}; use "
                                    f"{', '.join(HOOKS + p for p in PROVIDERS)}")
        if method != "POST":
            raise HookRejected(405, f"use POST {HOOKS}{name}")
        length = headers.get("Content-Length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            raise HookRejected(413, f"body of {length[:20]} bytes; the limit is "
                                    f"{MAX_BODY} bytes")
        content_type = headers.get("Content-Type", "")
        if content_type.split(";")[0].strip().lower() != JSON_TYPE:
            raise HookRejected(400, f"content type {content_type[:60]!r}; send {JSON_TYPE} "
                                    "(the webhook's 'Content type' setting)")
        self.provider = PROVIDERS[name]

    def data_received(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size <= MAX_BODY and not self.answered:  # past it, count but stop keeping
            self.chunks.append(chunk)

    def finish(self) -> None:
        if self.answered or self.provider is None:
            return
        if self.size > MAX_BODY:
            self.answer(413, {"error": f"body of more than {MAX_BODY} bytes; the limit is "
                                       f"{MAX_BODY} bytes"})
            return
        self.server.in_flight += 1
        self.server.spawn(self._respond(self.provider))

    async def _respond(self, provider: Provider) -> None:
        named = [a.strip() for a in parse_qs(self.query).get("app", []) if a.strip()]
        context = getattr(self.connection, "context", None)
        peer = str(getattr(context, "remote_ip", None) or "?")
        try:
            status, body = await self.server.handle(provider, self.headers, named,
                                                    b"".join(self.chunks), peer)
        except HookRejected as exc:
            status, body = exc.status, {"error": str(exc)}
        except Exception:
            log.exception("webhook: unexpected error answering %s", self.request_line)
            status, body = 500, {"error": "internal error; see the webhook service's log"}
        finally:
            self.server.in_flight -= 1
        self.answer(status, body)

    def on_connection_close(self) -> None:
        self.closed = True  # the sender went away mid-request: nothing to answer

    def answer(self, status: int, body: dict[str, Any],
               extra: dict[str, str] | None = None) -> None:
        if self.answered or self.closed:
            return
        self.answered = True
        data = json.dumps(body).encode()
        headers = httputil.HTTPHeaders({"Content-Type": "application/json; charset=UTF-8",
                                        "Content-Length": str(len(data)), **(extra or {})})
        line = httputil.ResponseStartLine("", status, HTTPStatus(status).phrase)
        try:
            # A HEAD answer has the headers of the GET answer but no body.
            self.connection.write_headers(line, headers, None if self.method == "HEAD" else data)
            self.connection.finish()
        except StreamClosedError:
            return
        log.debug("%d %s %.1f ms", status, self.request_line,
                  1000 * (time.monotonic() - self.started))
