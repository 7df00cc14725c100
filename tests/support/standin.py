"""A small HTTP stand-in for an app's health endpoint, run in the test process.

It answers with the version (commit) it serves, and can be told to misbehave:
answer 502, hang, redirect in a loop, send 10 MB, or dribble its answer a byte
every half second, for ever.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

HANG_SECONDS = 30.0  # a hanging answer; the probe must give up long before
DRIBBLE_EVERY = 0.5  # seconds between two bytes of a dribbled answer: under any read timeout


class AppStandIn:
    """``mode``: "serve" (200 + version), "502", "hang", "loop", "big", "dribble"."""

    def __init__(self, version: str = "", mode: str = "serve") -> None:
        self.version = version
        self.mode = mode
        self.requests = 0
        self._release = threading.Event()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                stand_in.requests += 1
                stand_in.answer(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/health"

    def answer(self, handler: BaseHTTPRequestHandler) -> None:
        mode = self.mode
        if mode == "hang":
            self._release.wait(HANG_SECONDS)
            return
        if mode == "dribble":  # a status line, then one header that never ends
            head = b"HTTP/1.1 200 OK\r\nX-Slow: "
            sent = 0
            while not self._release.wait(DRIBBLE_EVERY):
                try:
                    handler.wfile.write(head[sent:sent + 1] if sent < len(head) else b"a")
                    handler.wfile.flush()
                except OSError:
                    return  # the prober gave up
                sent += 1
            return
        if mode == "loop":
            handler.send_response(302)
            handler.send_header("Location", handler.path + ("x" if len(handler.path) < 50
                                                            else ""))
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        if mode == "502":
            self._send(handler, 502, b"bad gateway\n")
            return
        if mode == "big":
            body = b"0" * (10 * 1024 * 1024)
            self._send(handler, 200, body)
            return
        self._send(handler, 200, f'{{"version": "{self.version}"}}\n'.encode())

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, code: int, body: bytes) -> None:
        handler.send_response(code)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        try:
            handler.wfile.write(body)
        except OSError:
            pass  # the prober stopped reading (a capped body): expected

    def close(self) -> None:
        self._release.set()
        self.server.shutdown()
        self.server.server_close()
