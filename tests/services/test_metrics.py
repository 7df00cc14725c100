"""The Prometheus endpoint: a real `postdeploy metrics` scraped over HTTP."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from celery import Celery
from prometheus_client.parser import text_string_to_metric_families

from postdeploy.config.settings import AppConfig
from postdeploy.store import keys
from postdeploy.store.celery_app import QUEUE
from postdeploy.store.records import RunRecord, Status
from postdeploy.store.state import StateStore
from tests.support.core import GitRemote, RedisServer, Service, free_port, service_env, wait_for

SHA = "a" * 40
OLD_SHA = "b" * 40
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            return str(resp.read().decode())
    except (urllib.error.URLError, ConnectionError):
        return None


def samples(text: str) -> Samples:
    """Every sample by (name, labels), parsed by Prometheus' own client parser."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(parsed: Samples, name: str, **labels: str) -> float | None:
    return parsed.get((name, frozenset(labels.items())))


def finished_run(app: str, sha: str, trigger: str, status: Status, took: float,
                 ended: float) -> RunRecord:
    record = RunRecord.new(app, sha, trigger)
    record.status = status.value
    record.started_at = ended - took
    record.finished_at = ended
    return record


def start_metrics(services_dir: Path, env: dict[str, str]) -> tuple[Service, int]:
    port = free_port()
    service = Service(["-m", "postdeploy.cli", "metrics", "--port", str(port)], env,
                      services_dir / f"metrics-{port}.log")
    wait_for(lambda: scrape(port) or not service.alive(), 30, what="metrics to answer")
    assert service.alive(), service.log()
    return service, port


def test_metrics_describe_runs_checks_and_queue(redis_url: str, rclient: redis.Redis,
                                                tmp_path: Path,
                                                services: Callable[..., Service]) -> None:
    store = StateStore(rclient)
    store.register_apps([AppConfig("shop", repo="/srv/shop.git"),
                         AppConfig("blog", repo="/srv/blog.git")])
    store.observe("shop", SHA, None)
    now = time.time()
    ok = finished_run("shop", OLD_SHA, "auto", Status.SUCCEEDED, 4.0, now - 100)
    failed = finished_run("shop", SHA, "manual", Status.FAILED, 2.0, now - 10)
    for record in (ok, failed):
        store.add_run(record)
    for _ in range(2):
        store.check_failed("shop", "git ls-remote failed", 600)
    # Two messages waiting with no worker, sent as Celery sends them (prefix included).
    sender = Celery(broker=redis_url, broker_transport_options={
        "global_keyprefix": keys.CELERY_PREFIX})
    for _ in range(2):
        sender.send_task("postdeploy.check_commits", queue=QUEUE)

    # The run and notification counters, as the worker keeps them.
    rclient.hset(keys.RUNS_TOTAL, mapping={"shop\tauto\tsucceeded": 7,
                                           "shop\tmanual\tfailed": 2})
    rclient.hset(keys.NOTIFICATIONS_TOTAL, mapping={"sent": 3})

    service, port = start_metrics(tmp_path, service_env(redis_url, tmp_path / "state"))
    text = wait_for(lambda: scrape(port), 10, what="a scrape")
    parsed = samples(text)
    assert "# TYPE postdeploy_runs_total counter" in text
    assert "# TYPE postdeploy_runs gauge" in text

    assert value(parsed, "postdeploy_up") == 1
    assert value(parsed, "postdeploy_apps") == 2
    assert value(parsed, "postdeploy_queue_messages") == 2
    assert value(parsed, "postdeploy_runs", app="shop", trigger="auto", status="succeeded") == 1
    assert value(parsed, "postdeploy_runs", app="shop", trigger="manual", status="failed") == 1
    assert value(parsed, "postdeploy_last_run_status", app="shop", status="failed") == 1
    assert value(parsed, "postdeploy_last_run_status", app="shop", status="succeeded") == 0
    assert value(parsed, "postdeploy_last_run_failed", app="shop") == 1
    assert value(parsed, "postdeploy_last_run_timestamp_seconds", app="shop") == \
        failed.finished_at
    assert value(parsed, "postdeploy_last_success_timestamp_seconds", app="shop") == \
        ok.finished_at
    assert value(parsed, "postdeploy_last_run_duration_seconds", app="shop") == \
        failed.duration
    assert value(parsed, "postdeploy_run_duration_seconds", app="shop", quantile="1") == \
        ok.duration
    assert value(parsed, "postdeploy_run_duration_seconds", app="shop", quantile="0.5") == \
        failed.duration
    assert value(parsed, "postdeploy_check_errors_total", app="shop") == 2
    assert value(parsed, "postdeploy_check_errors_total", app="blog") == 0
    assert value(parsed, "postdeploy_last_seen_commit_info", app="shop", sha=SHA) == 1
    # Counters kept in Redis: all finished runs, not only the kept history.
    assert value(parsed, "postdeploy_runs_total", app="shop", trigger="auto",
                 status="succeeded") == 7
    assert value(parsed, "postdeploy_runs_total", app="shop", trigger="manual",
                 status="failed") == 2
    assert value(parsed, "postdeploy_notifications_total", result="sent") == 3
    assert value(parsed, "postdeploy_notifications_total", result="failed") == 0
    rclient.hincrby(keys.RUNS_TOTAL, "shop\tauto\tsucceeded", 1)
    assert value(samples(scrape(port) or ""), "postdeploy_runs_total", app="shop",
                 trigger="auto", status="succeeded") == 8
    # An app with no run yet has no last-run samples rather than made-up ones.
    assert value(parsed, "postdeploy_last_run_failed", app="blog") is None

    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)
        raise AssertionError("expected 404 outside /metrics")
    except urllib.error.HTTPError as exc:
        assert exc.code == 404
    service.stop()
    assert service.proc.returncode == 0, service.log()  # SIGTERM is a clean stop


def test_a_prometheus_scrape_gets_the_text_format(redis_url: str, rclient: redis.Redis,
                                                  tmp_path: Path) -> None:
    rclient.hset(keys.RUNS_TOTAL, mapping={"shop\tauto\tsucceeded": 1})
    service, port = start_metrics(tmp_path, service_env(redis_url, tmp_path / "state"))
    # The Accept header Prometheus sends: OpenMetrics first.
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={
        "Accept": "application/openmetrics-text;version=1.0.0;q=0.5,"
                  "text/plain;version=0.0.4;q=0.3,*/*;q=0.1"})
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = resp.read().decode()
    finally:
        service.stop()
    # One TYPE line per name: in OpenMetrics both would be the family postdeploy_runs.
    types = re.findall(r"^# TYPE (\S+) ", text, flags=re.MULTILINE)
    assert "postdeploy_runs" in types and "postdeploy_runs_total" in types
    assert len(types) == len(set(types)), types
    assert value(samples(text), "postdeploy_runs_total", app="shop", trigger="auto",
                 status="succeeded") == 1


def test_metrics_report_redis_down_instead_of_failing(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", persistent=False).start()
    service, port = start_metrics(tmp_path, service_env(server.url, tmp_path / "state"))
    try:
        assert value(samples(scrape(port) or ""), "postdeploy_up") == 1
        server.stop()
        down = wait_for(lambda: (text := scrape(port)) and
                        value(samples(text), "postdeploy_up") == 0 and text,
                        20, what="postdeploy_up 0")
        assert "postdeploy_runs" not in down
    finally:
        service.stop()
        server.stop()


def test_bad_settings_are_one_line_and_exit_2(tmp_path: Path) -> None:
    env = service_env("redis://127.0.0.1:1/0", tmp_path / "state",
                      POSTDEPLOY_REDIS_URL="http://not-redis")
    proc = subprocess.run([sys.executable, "-m", "postdeploy.cli", "metrics"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("postdeploy: error: invalid POSTDEPLOY_REDIS_URL")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_metrics_listen_on_ipv6_loopback(redis_url: str, tmp_path: Path) -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("this machine has no IPv6 loopback")
    port = free_port()
    service = Service(["-m", "postdeploy.cli", "metrics", "--address", "::1", "--port", str(port)],
                      service_env(redis_url, tmp_path / "state"), tmp_path / "metrics6.log")

    def scrape6() -> str | None:
        try:
            with urllib.request.urlopen(f"http://[::1]:{port}/metrics", timeout=5) as resp:
                return str(resp.read().decode())
        except (urllib.error.URLError, ConnectionError):
            return None

    try:
        text = wait_for(lambda: scrape6() or (not service.alive() and "dead"), 30,
                        what="metrics on [::1]")
        assert service.alive(), service.log()
        assert value(samples(text), "postdeploy_up") == 1
    finally:
        service.stop()


def test_job_durations_are_a_histogram_counted_as_runs_end(
        redis_url: str, rclient: redis.Redis, tmp_path: Path, remote: GitRemote,
        services: Callable[..., Service], env_for: Callable[..., dict[str, str]]) -> None:
    from tests.support.core import appspec_yaml, finished_runs

    remote.commit({"appspec.yaml": appspec_yaml("sleep 2")})
    env = env_for(remote)
    services("worker", env), services("beat", env)
    wait_for(lambda: finished_runs(rclient, "shop"), 60, what="the run to end")
    remote.commit({"appspec.yaml": appspec_yaml("exit 4")})
    wait_for(lambda: len(finished_runs(rclient, "shop")) == 2, 60, what="the second run")
    took = [r.duration or 0 for r in finished_runs(rclient, "shop")]

    service, port = start_metrics(tmp_path, service_env(redis_url, tmp_path / "state"))
    try:
        text = wait_for(lambda: scrape(port), 10, what="a scrape")
        parsed = samples(text)
        assert "# TYPE postdeploy_job_duration_seconds histogram" in text
        bucket = "postdeploy_job_duration_seconds_bucket"
        assert value(parsed, bucket, app="shop", le="1.0") == 1  # the failing one, at once
        assert value(parsed, bucket, app="shop", le="5.0") == 2
        assert value(parsed, bucket, app="shop", le="+Inf") == 2
        assert value(parsed, "postdeploy_job_duration_seconds_count", app="shop") == 2
        assert abs((value(parsed, "postdeploy_job_duration_seconds_sum", app="shop") or 0)
                   - sum(took)) < 0.01
    finally:
        service.stop()


def test_a_deployment_whose_job_has_not_finished_shows_how_long_it_has_waited(
        redis_url: str, rclient: redis.Redis, tmp_path: Path) -> None:
    from postdeploy.store.lifecycle import move, new_run

    store = StateStore(rclient)
    store.register_apps([AppConfig("shop", repo="/srv/shop.git")])
    deployment = store.observe("shop", SHA, None).deployment
    service, port = start_metrics(tmp_path, service_env(redis_url, tmp_path / "state"))
    try:
        def unfinished() -> float | None:
            return value(samples(scrape(port) or ""),
                         "postdeploy_deployment_unfinished_seconds", app="shop")

        # It counts up while the deployment's job has not finished.
        first = wait_for(unfinished, 10, what="the gauge")
        wait_for(lambda: (unfinished() or 0) >= first + 1.0, 10, what="the gauge to grow")
        run = new_run(store, "shop", SHA, "auto", 300, deployment)
        assert move(store, run, Status.RUNNING) and move(store, run, Status.SUCCEEDED)
        assert value(samples(scrape(port) or ""), "postdeploy_deployment_unfinished_seconds",
                     app="shop") == 0
    finally:
        service.stop()
