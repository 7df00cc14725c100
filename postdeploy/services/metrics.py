"""`postdeploy metrics`: Prometheus metrics per app.

A prometheus_client collector reads what postdeploy keeps in Redis (run
history, run and notification counters, last seen commits, check error
counters, the job queue) on each scrape. Flower's own ``/metrics`` adds per-task
event counters and runtime histograms; this endpoint adds what only postdeploy
knows: apps and commits. ``postdeploy_runs`` and the durations describe the
kept history (the last POSTDEPLOY_HISTORY_LIMIT runs per app), so they are
gauges; ``postdeploy_runs_total`` counts every finished run, kept in Redis so it
survives restarts of this process.
"""

from __future__ import annotations

import logging
import math
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import redis
from kombu.transport.redis import PRIORITY_STEPS
from kombu.transport.redis import Channel as RedisChannel
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from postdeploy.config.settings import Settings
from postdeploy.services.start import check_listen, prepare
from postdeploy.store import keys
from postdeploy.store.celery_app import QUEUE
from postdeploy.store.connection import redis_client
from postdeploy.store.records import RunRecord, Status
from postdeploy.store.state import DURATION_BUCKETS, StateStore
from postdeploy.store.verdict import judge

log = logging.getLogger(__name__)

PATH = "/metrics"
QUANTILES = (0.5, 0.9, 1.0)  # of run durations over the kept history
FAILED = (Status.FAILED, Status.TIMED_OUT, Status.ERROR, Status.LOST)
NOTIFICATION_RESULTS = ("sent", "failed")  # fields of keys.NOTIFICATIONS_TOTAL
UP_HELP = "1 if postdeploy's Redis answered this scrape."
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class PostdeployCollector(Collector):
    """Every postdeploy metric, read from Redis at scrape time (nothing cached)."""

    def __init__(self, store: StateStore, app_names: Iterable[str] = ()) -> None:
        self.store = store
        self.app_names = tuple(app_names)

    def collect(self) -> Iterator[Metric]:
        """The apps are the configured ones plus those workers registered."""
        try:
            snapshot = _Snapshot(self.store, self.app_names)
        except redis.RedisError as exc:
            log.warning("metrics: Redis unavailable: %s", exc)
            yield GaugeMetricFamily("postdeploy_up", UP_HELP, value=0)
            return
        yield GaugeMetricFamily("postdeploy_up", UP_HELP, value=1)
        yield from snapshot.metrics()


class _Snapshot:
    """What one scrape read from Redis, turned into metric families."""

    def __init__(self, store: StateStore, app_names: Iterable[str]) -> None:
        self.apps = sorted(set(app_names) | set(store.registered_apps()))
        self.histories = {name: store.history(name) for name in self.apps}
        self.last_seen = {name: store.last_seen(name) for name in self.apps}
        self.check_errors = {name: store.check_errors(name) for name in self.apps}
        self.queued = queue_length(store.client)
        self.runs_total = _hash_counts(store.client, keys.RUNS_TOTAL)
        self.notifications = _hash_counts(store.client, keys.NOTIFICATIONS_TOTAL)
        self.durations = _hash_counts(store.client, keys.RUN_DURATIONS)
        self.verdicts = {name: judge(store, name, history=self.histories[name])
                         for name in self.apps}

    def metrics(self) -> Iterator[Metric]:
        apps, histories = self.apps, self.histories
        yield GaugeMetricFamily("postdeploy_apps", "Apps configured or registered by a worker.",
                                value=len(apps))
        yield GaugeMetricFamily("postdeploy_queue_messages",
                                "Job and check messages waiting in the Celery queue.",
                                value=self.queued)
        yield _family(GaugeMetricFamily, "postdeploy_runs",
                      "Runs in the kept history (last N per app) by app, trigger and status.",
                      ["app", "trigger", "status"],
                      [([a, t, s], n) for a in apps
                       for (t, s), n in sorted(_counts(histories[a]).items())])
        yield _family(CounterMetricFamily, "postdeploy_runs",
                      "Finished runs by app, trigger and status since Redis was set up.",
                      ["app", "trigger", "status"],
                      [(list(fields), n) for fields, n in sorted(self.runs_total.items())
                       if len(fields) == 3])
        yield _family(CounterMetricFamily, "postdeploy_notifications",
                      "Failure and recovery notifications, by whether they were sent.",
                      ["result"],
                      [([r], self.notifications.get((r,), 0)) for r in NOTIFICATION_RESULTS])
        yield _family(GaugeMetricFamily, "postdeploy_last_run_status",
                      "1 for the status of the app's latest run, 0 for the others.",
                      ["app", "status"],
                      [([a, s.value], float(histories[a][0].status == s.value))
                       for a in apps if histories[a] for s in Status])
        latest = {a: r for a in apps if (r := _latest_finished(histories[a]))}
        yield _family(GaugeMetricFamily, "postdeploy_last_run_failed",
                      "1 if the app's latest finished run failed, timed out, errored or "
                      "was lost.", ["app"],
                      [([a], float(r.status in FAILED)) for a, r in latest.items()])
        yield _family(GaugeMetricFamily, "postdeploy_last_run_timestamp_seconds",
                      "When the app's latest finished run ended (Unix time).", ["app"],
                      [([a], r.finished_at or 0) for a, r in latest.items()])
        yield _family(GaugeMetricFamily, "postdeploy_last_success_timestamp_seconds",
                      "When the app's latest succeeded run (in the kept history) ended "
                      "(Unix time).", ["app"],
                      [([a], r.finished_at or 0) for a in apps
                       if (r := _latest(histories[a], Status.SUCCEEDED))])
        yield _family(GaugeMetricFamily, "postdeploy_last_run_duration_seconds",
                      "How long the app's latest finished run took.", ["app"],
                      [([a], r.duration or 0) for a, r in latest.items() if r.started_at])
        yield _family(GaugeMetricFamily, "postdeploy_run_duration_seconds",
                      "Quantiles of run durations over the kept history (1 is the longest).",
                      ["app", "quantile"],
                      [([a, f"{q:g}"], d) for a in apps for q, d in _quantiles(histories[a])])
        yield self._durations_histogram()
        now = time.time()
        yield _family(GaugeMetricFamily, "postdeploy_deployment_unfinished_seconds",
                      "Seconds since the app's current deployment began while its job has "
                      "not finished everywhere it must run; 0 once it has.", ["app"],
                      [([a], max(0.0, now - v.deployment.at) if not v.finished else 0.0)
                       for a, v in self.verdicts.items() if v.deployment is not None])
        yield _family(CounterMetricFamily, "postdeploy_check_errors",
                      "Commit checks that failed (git unreachable, bad ref, ...).", ["app"],
                      [([a], self.check_errors[a]) for a in apps])
        yield _family(GaugeMetricFamily, "postdeploy_last_seen_commit_info",
                      "The commit the latest check saw, as a label.", ["app", "sha"],
                      [([a, sha], 1) for a in apps if (sha := self.last_seen[a])])


    def _durations_histogram(self) -> Metric:
        family = HistogramMetricFamily(
            "postdeploy_job_duration_seconds",
            "How long jobs ran (start to end; runs that never started are not counted), "
            "since Redis was set up.", labels=["app"])
        for app in sorted({fields[0] for fields in self.durations}):
            count = self.durations.get((app, "count"), 0)
            buckets = [(str(float(bound)), self.durations.get((app, f"{bound:g}"), 0))
                       for bound in DURATION_BUCKETS] + [("+Inf", count)]
            family.add_metric([app], buckets, self.durations.get((app, "sum"), 0))
        return family


def queue_length(client: redis.Redis) -> int:
    """Messages waiting in our queue: kombu keeps one Redis list per priority step."""
    pipe = client.pipeline(transaction=False)
    for step in PRIORITY_STEPS:
        suffix = f"{RedisChannel.sep}{step}" if step else ""
        pipe.llen(f"{keys.CELERY_PREFIX}{QUEUE}{suffix}")
    return sum(int(n) for n in pipe.execute())


def metrics_app(registry: CollectorRegistry) -> WSGIApp:
    """prometheus_client's WSGI app on /metrics only, always in the 0.0.4 text format.

    OpenMetrics names a counter's family without ``_total``, so the kept-history
    gauge ``postdeploy_runs`` and the counter ``postdeploy_runs_total`` would be
    two families of one name there; the text format keeps them apart.
    """
    exposition: WSGIApp = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != PATH:
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [f"not found; metrics are at {PATH}\n".encode()]
        environ.pop("HTTP_ACCEPT", None)
        return exposition(environ, start_response)

    return app


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        log.debug("metrics: " + format, *args)  # scrapes every 15 s would flood the log


def run_metrics(settings: Settings, address: str, port: int) -> None:
    """Serve /metrics until SIGTERM or Ctrl-C; ConfigError for a bad setting or address."""
    url = prepare(settings, need_apps=False)  # like Flower: workers register their apps
    registry = CollectorRegistry(auto_describe=False)
    store = StateStore(redis_client(url), settings.history_limit)
    registry.register(PostdeployCollector(store, [a.name for a in settings.apps]))
    check_listen(address, port)

    class Server(ThreadingWSGIServer):
        # IPv4 or IPv6, as the address is written (prometheus_client does the same).
        address_family = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)[0][0]

    server = make_server(address, port, metrics_app(registry), Server,
                         handler_class=_QuietHandler)
    log.info("metrics: serving http://%s:%d%s", address, port, PATH)
    _stop_on_sigterm(server)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def _stop_on_sigterm(server: ThreadingWSGIServer) -> None:
    def stop(*_: Any) -> None:
        # shutdown() waits for serve_forever, which runs in this thread: ask from another.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)


def _family(kind: Callable[..., Any], name: str, help_text: str, labels: list[str],
            samples: Iterable[tuple[list[str], float]]) -> Metric:
    family: Any = kind(name, help_text, labels=labels)
    for values, number in samples:
        family.add_metric(values, number)
    return family  # type: ignore[no-any-return]


def _hash_counts(client: redis.Redis, key: str) -> dict[tuple[str, ...], float]:
    """A Redis hash of counters, its fields split on tabs ("app\ttrigger\tstatus")."""
    raw: dict[bytes, bytes] = client.hgetall(key)  # type: ignore[assignment]
    counts: dict[tuple[str, ...], float] = {}
    for field, count in raw.items():
        try:
            counts[tuple(field.decode().split("\t"))] = float(count)
        except (UnicodeDecodeError, ValueError):
            log.warning("metrics: ignoring malformed counter %r in %s", field, key)
    return counts


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
