"""`python -m postdeploy.metrics [--address A] [--port P]`: Prometheus metrics per app.

Rendered on each scrape from what postdeploy keeps in Redis (run history,
last seen commits, check error counters, the job queue), in Prometheus' text
format. Flower's own ``/metrics`` adds per-task event counters and runtime
histograms; this endpoint adds what only postdeploy knows: apps and commits.
Run counts and durations describe the kept history (the last
POSTDEPLOY_HISTORY_LIMIT runs per app), so they are gauges, not counters.
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import redis
from kombu.transport.redis import PRIORITY_STEPS
from kombu.transport.redis import Channel as RedisChannel

from postdeploy import keys
from postdeploy.celery_app import QUEUE
from postdeploy.config import Settings
from postdeploy.connection import redis_client, resolve_redis_url
from postdeploy.errors import ConfigError, PostdeployError
from postdeploy.logconfig import configure_logging
from postdeploy.records import RunRecord, Status
from postdeploy.state import StateStore

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "127.0.0.1"  # loopback unless asked: metrics name apps and commits
DEFAULT_PORT = 9808
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus text format
QUANTILES = (0.5, 0.9, 1.0)  # of run durations over the kept history
FAILED = (Status.FAILED, Status.TIMED_OUT, Status.ERROR, Status.LOST)


class Exposition:
    """Prometheus text format: HELP and TYPE once per metric, then its samples."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def metric(self, name: str, kind: str, help_text: str,
               samples: Iterable[tuple[dict[str, str], float]]) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            self.lines.append(f"{name}{_labels(labels)} {_number(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def render(store: StateStore, app_names: Iterable[str] = ()) -> str:
    """The metrics page; apps are the configured ones plus those workers registered."""
    page = Exposition()
    try:
        apps = sorted(set(app_names) | set(store.registered_apps()))
        histories = {name: store.history(name) for name in apps}
        last_seen = {name: store.last_seen(name) for name in apps}
        check_errors = {name: store.check_errors(name) for name in apps}
        queued = queue_length(store.client)
    except redis.RedisError as exc:
        log.warning("metrics: Redis unavailable: %s", exc)
        page.metric("postdeploy_up", "gauge", "1 if postdeploy's Redis answered this scrape.",
                    [({}, 0)])
        return page.text()
    page.metric("postdeploy_up", "gauge", "1 if postdeploy's Redis answered this scrape.",
                [({}, 1)])
    page.metric("postdeploy_apps", "gauge", "Apps configured or registered by a worker.",
                [({}, len(apps))])
    page.metric("postdeploy_queue_messages", "gauge",
                "Job and check messages waiting in the Celery queue.", [({}, queued)])
    page.metric("postdeploy_runs", "gauge",
                "Runs in the kept history (last N per app) by app, trigger and status.",
                [({"app": a, "trigger": t, "status": s}, n)
                 for a in apps for (t, s), n in sorted(_counts(histories[a]).items())])
    page.metric("postdeploy_last_run_status", "gauge",
                "1 for the status of the app's latest run, 0 for the others.",
                [({"app": a, "status": s.value}, float(histories[a][0].status == s.value))
                 for a in apps if histories[a] for s in Status])
    page.metric("postdeploy_last_run_failed", "gauge",
                "1 if the app's latest finished run failed, timed out, errored or was lost.",
                [({"app": a}, float(r.status in FAILED))
                 for a in apps if (r := _latest_finished(histories[a]))])
    page.metric("postdeploy_last_run_timestamp_seconds", "gauge",
                "When the app's latest finished run ended (Unix time).",
                [({"app": a}, r.finished_at or 0)
                 for a in apps if (r := _latest_finished(histories[a]))])
    page.metric("postdeploy_last_success_timestamp_seconds", "gauge",
                "When the app's latest succeeded run (in the kept history) ended (Unix time).",
                [({"app": a}, r.finished_at or 0)
                 for a in apps if (r := _latest(histories[a], Status.SUCCEEDED))])
    page.metric("postdeploy_last_run_duration_seconds", "gauge",
                "How long the app's latest finished run took.",
                [({"app": a}, r.duration or 0)
                 for a in apps if (r := _latest_finished(histories[a])) and r.started_at])
    page.metric("postdeploy_run_duration_seconds", "gauge",
                "Quantiles of run durations over the kept history (1 is the longest).",
                [({"app": a, "quantile": _number(q)}, d)
                 for a in apps for q, d in _quantiles(histories[a])])
    page.metric("postdeploy_check_errors_total", "counter",
                "Commit checks that failed (git unreachable, bad ref, ...).",
                [({"app": a}, check_errors[a]) for a in apps])
    page.metric("postdeploy_last_seen_commit_info", "gauge",
                "The commit the latest check saw, as a label.",
                [({"app": a, "sha": sha}, 1) for a in apps if (sha := last_seen[a])])
    return page.text()


def queue_length(client: redis.Redis) -> int:
    """Messages waiting in our queue: kombu keeps one Redis list per priority step."""
    pipe = client.pipeline(transaction=False)
    for step in PRIORITY_STEPS:
        suffix = f"{RedisChannel.sep}{step}" if step else ""
        pipe.llen(f"{keys.CELERY_PREFIX}{QUEUE}{suffix}")
    return sum(int(n) for n in pipe.execute())


class MetricsHandler(BaseHTTPRequestHandler):
    """GET /metrics; everything else is 404."""

    server: MetricsServer

    def do_GET(self) -> None:  # noqa: N802  (http.server's naming)
        if self.path.split("?", 1)[0] != "/metrics":
            self._send(404, "text/plain; charset=utf-8", "not found; metrics are at /metrics\n")
            return
        self._send(200, CONTENT_TYPE, render(self.server.store, self.server.app_names))

    def _send(self, status: int, content_type: str, body: str) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        log.debug("metrics: " + format, *args)  # scrapes every 15 s would flood the log


class MetricsServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], store: StateStore,
                 app_names: Sequence[str]) -> None:
        super().__init__(address, MetricsHandler)
        self.store = store
        self.app_names = app_names


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m postdeploy.metrics",
                                     description="Serve postdeploy's Prometheus metrics.")
    parser.add_argument("--address", default=DEFAULT_ADDRESS,
                        help=f"address to listen on (default {DEFAULT_ADDRESS})")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"port to listen on (default {DEFAULT_PORT})")
    return parser.parse_args(list(argv))


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        settings = Settings.load()  # like Flower, no apps needed: workers register theirs
        if not 0 < args.port < 65_536:
            raise ConfigError(f"invalid --port: {args.port} is not a TCP port (1-65535)")
        url = resolve_redis_url(settings)
    except PostdeployError as exc:
        print(f"postdeploy metrics: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(settings.log_level)
    store = StateStore(redis_client(url), settings.history_limit)
    try:
        server = MetricsServer((args.address, args.port), store,
                               [a.name for a in settings.apps])
    except OSError as exc:
        print(f"postdeploy metrics: cannot listen on {args.address}:{args.port}: "
              f"{exc.strerror}", file=sys.stderr)
        raise SystemExit(2) from None
    log.info("metrics: serving http://%s:%d/metrics", args.address, args.port)
    _stop_on_sigterm(server)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def _stop_on_sigterm(server: MetricsServer) -> None:
    def stop(*_: Any) -> None:
        # shutdown() waits for serve_forever, which runs in this thread: ask from another.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)


def _counts(history: list[RunRecord]) -> Counter[tuple[str, str]]:
    return Counter((r.trigger, r.status) for r in history)


def _latest_finished(history: list[RunRecord]) -> RunRecord | None:
    return next((r for r in history if Status(r.status).finished
                 and r.status != Status.SUPERSEDED.value), None)


def _latest(history: list[RunRecord], status: Status) -> RunRecord | None:
    return next((r for r in history if r.status == status.value), None)


def _quantiles(history: list[RunRecord]) -> list[tuple[float, float]]:
    durations = sorted(r.duration for r in history
                       if r.duration is not None and r.finished_at is not None)
    if not durations:
        return []
    # Nearest rank: the smallest duration that q of the runs do not exceed.
    return [(q, durations[max(0, math.ceil(q * len(durations)) - 1)]) for q in QUANTILES]


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    parts = (f'{k}="{_escape(v)}"' for k, v in labels.items())
    return "{" + ",".join(parts) + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return repr(int(value)) if float(value).is_integer() else repr(float(value))


if __name__ == "__main__":
    main()
