"""The readiness gate: is the app on this host up (and serving the run's commit) yet?

An app asks for it in appspec.yaml (POST_DEPLOY_WAIT_URL, _WAIT_FOR_COMMIT,
_WAIT_TIMEOUT) so that a cache warm-up or a notification never hits the
previous version. One probe is one bounded HTTP GET: a timeout per read, a
total deadline for the whole look, a capped body, a limited number of
redirects, so a health endpoint that hangs, sends its answer a byte at a time,
redirects in a loop or answers 10 MB costs a few seconds and 64 KiB at most.
"""

from __future__ import annotations

import functools
import http.client
import re
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from http.client import HTTPMessage
from types import TracebackType
from typing import IO, Any

from postdeploy.errors import AppSpecError

DEFAULT_WAIT_TIMEOUT = 300  # seconds the gate waits for the app; the guide's job timeout too
PROBE_TIMEOUT = 3.0  # seconds one connect or read may wait: a health endpoint answers at once
# Seconds for a whole probe: a socket timeout only bounds each read, so an endpoint
# sending a byte every 0.5 s would otherwise hold the look for hours.
PROBE_DEADLINE = 5.0
PROBE_BODY_LIMIT = 64 * 1024  # bytes of the answer read: a version string is a few bytes
MAX_REDIRECTS = 5  # a health URL may redirect once or twice; a loop ends here
PROBE_EVERY = 2.0  # seconds between probes while the gate waits
MIN_COMMIT_CHARS = 7  # what `git log --oneline` shows; shorter would match by chance
_VAR = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")
_TRUE, _FALSE = frozenset({"true", "yes", "1"}), frozenset({"false", "no", "0", ""})


@dataclass(frozen=True)
class Gate:
    """What the app asked to wait for; ``url`` is unexpanded (``$VAR`` left in)."""

    url: str
    wait_for_commit: bool = False
    timeout: int = DEFAULT_WAIT_TIMEOUT


@dataclass(frozen=True)
class Probe:
    """One look at the app: ready or not, and what it answered, for the run's reason."""

    ready: bool
    answer: str


def parse_wait_for_commit(raw: str | None) -> bool:
    """POST_DEPLOY_WAIT_FOR_COMMIT: "true" or "false"; anything else is an AppSpecError."""
    text = (raw or "").strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise AppSpecError(f"invalid POST_DEPLOY_WAIT_FOR_COMMIT: {(raw or '')[:40]!r}; "
                       'use "true" or "false"')


def expand(template: str, env: Mapping[str, str]) -> str:
    """``$VAR`` and ``${VAR}`` from ``env``; an unset variable is an AppSpecError."""
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in env:
            raise AppSpecError(f"POST_DEPLOY_WAIT_URL uses ${name}, which the job's "
                               "environment does not set; add it to appspec.yaml envs")
        return env[name]

    return _VAR.sub(value, template)


def check_url(url: str) -> str:
    """Refuse anything but a plain http(s) URL with a host and no credentials."""
    try:
        parts = urllib.parse.urlsplit(url.strip())
        host = parts.hostname
        parts.port  # noqa: B018 (raises ValueError for a port out of range)
    except ValueError as exc:
        raise AppSpecError(f"POST_DEPLOY_WAIT_URL is not a valid URL ({exc})") from None
    if parts.scheme.lower() not in ("http", "https"):
        scheme = f"{parts.scheme}://" if parts.scheme else "no scheme"
        raise AppSpecError(f"POST_DEPLOY_WAIT_URL uses {scheme[:20]}; only http:// and "
                           "https:// URLs can be waited for")
    if parts.username is not None or parts.password is not None:
        raise AppSpecError("POST_DEPLOY_WAIT_URL carries credentials (user:password@); "
                           "a health endpoint must answer without them")
    if not host:
        raise AppSpecError("POST_DEPLOY_WAIT_URL has no host; give e.g. "
                           "http://localhost:8080/health")
    if any(c.isspace() for c in url.strip()):
        raise AppSpecError("POST_DEPLOY_WAIT_URL contains spaces; encode them as %20")
    return url.strip()


def gate_url(gate: Gate, env: Mapping[str, str]) -> str:
    """The URL to poll: expanded from the job's environment, then checked."""
    return check_url(expand(gate.url, env))


def check_template(template: str) -> None:
    """What can be checked before ``$VAR`` expansion: a literal scheme and credentials."""
    literal = template.strip()
    if literal.startswith("$"):
        return  # the whole URL comes from a variable: checked when the run expands it
    # "1" fits any place a variable may stand in: host, port, path, user or password.
    check_url(_VAR.sub("1", literal))


def probe(url: str, sha: str | None = None, timeout: float = PROBE_TIMEOUT,
          body_limit: int = PROBE_BODY_LIMIT, within: float = PROBE_DEADLINE) -> Probe:
    """GET ``url`` once; ready on 2xx (and, with ``sha``, its first 7+ chars in the body).

    Returns within about ``within`` seconds whatever the server does: at that moment
    the probe's sockets are shut, which ends a read in progress.
    """
    within = max(0.05, within)
    with _Deadline(within) as deadline:
        result = _probe(url, sha, min(timeout, within), body_limit, deadline)
    if deadline.expired and not result.ready:
        return Probe(False, f"no complete answer within {within:.1f} s")
    return result


def _probe(url: str, sha: str | None, timeout: float, body_limit: int,
           deadline: _Deadline) -> Probe:
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), _Redirects(),
        _HTTPHandler(deadline), _HTTPSHandler(deadline))
    request = urllib.request.Request(url, headers={"User-Agent": "postdeploy-readiness"})
    try:
        with opener.open(request, timeout=timeout) as response:
            status = int(response.status)
            body = _read_capped(response, body_limit) if sha else b""
    except urllib.error.HTTPError as exc:
        exc.close()
        if 300 <= exc.code < 400:
            return Probe(False, f"{exc.code}, a redirect loop or a redirect to a non-http "
                                f"URL (at most {MAX_REDIRECTS} redirects are followed)")
        return Probe(False, str(exc.code))
    except urllib.error.URLError as exc:
        return Probe(False, _describe(exc.reason, timeout))
    # Timeouts while reading, bad status lines, a body cut short, ...
    except (OSError, ValueError, http.client.HTTPException) as exc:
        return Probe(False, _describe(exc, timeout))
    if not 200 <= status < 300:
        return Probe(False, str(status))
    if sha and not _has_commit(body, sha):
        return Probe(False, f"{status} without commit {sha[:MIN_COMMIT_CHARS]}")
    return Probe(True, str(status))


def not_ready_reason(url: str, last: Probe | None, waited: float) -> str:
    answered = f"last answered {last.answer}" if last else "was not probed"
    return f"not ready: {url} {answered} after {waited:.0f} s"


def _read_capped(response: IO[bytes], limit: int) -> bytes:
    """At most ``limit`` bytes (a trickling server is cut by the probe's deadline)."""
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = response.read(min(16 * 1024, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _has_commit(body: bytes, sha: str) -> bool:
    """The body names the commit: a hex run of 7+ chars that is a prefix of ``sha``."""
    text = body.decode("latin-1").lower()
    return any(sha.lower().startswith(m) for m in
               re.findall(rf"[0-9a-f]{{{MIN_COMMIT_CHARS},40}}", text))


def _describe(reason: object, timeout: float) -> str:
    if isinstance(reason, (TimeoutError, socket.timeout)) or "timed out" in str(reason):
        return f"nothing within {timeout:g} s"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, socket.gaierror):
        return "an unknown host name"
    if isinstance(reason, ConnectionResetError):
        return "a reset connection"
    text = str(getattr(reason, "strerror", None) or reason).strip() or type(reason).__name__
    return text[:120]


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Follow at most MAX_REDIRECTS redirects, and only to http(s)."""

    max_redirections = MAX_REDIRECTS
    max_repeats = MAX_REDIRECTS

    def redirect_request(self, req: urllib.request.Request, fp: IO[bytes], code: int,
                         msg: str, headers: HTTPMessage, newurl: str
                         ) -> urllib.request.Request | None:
        target = urllib.parse.urlsplit(urllib.parse.urljoin(req.full_url, newurl))
        if target.scheme not in ("http", "https") or target.username or target.password:
            raise urllib.error.HTTPError(req.full_url, code, "redirect to a non-http URL",
                                         headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class _Deadline:
    """Shuts every socket a probe opens once ``within`` seconds have passed.

    Shutting a socket ends a read blocked on it at once, in any thread; so the
    probe ends on time however the server paces its bytes, and leaves nothing
    running behind it.
    """

    def __init__(self, within: float) -> None:
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(within, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._timer.cancel()

    def watch(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                _shut(sock)
        return sock

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shut(sock)


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # closed already


class _HTTPConnection(http.client.HTTPConnection):
    """An HTTP connection whose socket the probe's deadline can shut."""

    def __init__(self, *args: Any, deadline: _Deadline, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._create_connection = lambda *a, **k: deadline.watch(
            socket.create_connection(*a, **k))


class _HTTPSConnection(http.client.HTTPSConnection):
    """The same for https: the raw socket below TLS is the one shut."""

    def __init__(self, *args: Any, deadline: _Deadline, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._create_connection = lambda *a, **k: deadline.watch(
            socket.create_connection(*a, **k))


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline) -> None:
        super().__init__()
        self.deadline = deadline

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(functools.partial(_HTTPConnection, deadline=self.deadline), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline) -> None:
        super().__init__()
        self.deadline = deadline

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(functools.partial(_HTTPSConnection, deadline=self.deadline), req)
