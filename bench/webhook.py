"""6. The push trigger: commit -> job start through the webhook, and answers under load.

Latency: a commit is pushed to a local repository, then its GitHub push event
(signed, as GitHub sends it) is POSTed to a real `postdeploy webhook`
in front of a real worker; measured from the POST to the job's process starting
(it prints $EPOCHREALTIME). The baseline is what the poll alone gives at its
default 30 s interval: a commit waits for the next check, on average half an
interval (15 s), 28.5 s at the 95th percentile, before the same trigger path.
Load: 200 deliveries (distinct ids, so none is a replay) sent on 200 open
connections at once, each timed from its request leaving the client to its
answer arriving, while the worker consumes the checks; against the floor of
the server library: Tornado's HTTP server with the service's settings
answering 202 to each request without looking at it, under the same load
(rounds alternate between the servers so all see the same machine). The
service runs with its default number of processes (one per CPU, at most 4) and
with one, each against the bare server in as many processes sharing the port.
The same bare answer through ``tornado.web`` (an Application, a RequestHandler)
under the same load shows what the web framework costs over the bare server:
what the service saves by answering through Tornado's request-delegate
interface (postdeploy/webhook/http.py).
"""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from bench.harness import (
    GitRemote,
    Service,
    process_tree,
    service_env,
    tree_cpu,
    wait_for,
    wait_ready,
)
from bench.report import Row, median, percentile
from postdeploy.store.state import StateStore
from postdeploy.webhook.processes import default_count
from tests.support.core import REPO_ROOT, appspec_yaml, free_port
from tests.support.webhook_client import github_push, post, post_concurrently, raw_request, signed

SECRET = "bench-webhook-secret"
POLL_INTERVAL = 30.0  # seconds: the default check interval the poll is compared at
LATENCY_TARGET_MS = 100.0
ANSWER_TARGET_MS = 50.0


def _answers(port: int) -> bool:
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
            return True
    except urllib.error.HTTPError:
        return True  # an answer all the same (the floor answers 202 to anything)
    except OSError:
        return False


def _push(port: int, remote: GitRemote) -> int:
    payload = github_push("bench/app", after=remote.head())
    payload["repository"]["clone_url"] = remote.url
    body, headers = signed("github", SECRET, payload)
    return post(port, "/hooks/github", body, headers).status


def _job_start(store: StateStore, sha: str, timeout: float = 60) -> float:
    """When the job of ``sha`` started, as it printed it ($EPOCHREALTIME)."""
    def started() -> float | None:
        latest = store.latest_run("bench")
        if latest is None or latest.sha != sha or latest.status in ("queued", "running"):
            return None
        tail, _ = store.read_output(latest.id)
        return float(tail.decode().split("START ", 1)[1].split()[0])
    found: float = wait_for(started, timeout, 0.002, what=f"the run of {sha[:7]}")
    return found


@dataclass
class Server:
    """One server under the delivery bursts, and what it gave."""

    label: str
    service: Service
    port: int
    times: list[float] = field(default_factory=list)  # ms, every delivery of every round
    walls: list[float] = field(default_factory=list)  # ms, the last answer of each round
    cpu: float = 0.0  # CPU seconds, all rounds

    def cpu_per_delivery(self) -> float:
        return 1000 * self.cpu / len(self.times)  # ms


def measure(root: Path, redis_url: str, commits: int, deliveries: int = 200,
            rounds: int = 3) -> list[Row]:
    root.mkdir(parents=True, exist_ok=True)
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    store = StateStore(client)
    remote = GitRemote(root / "git", "bench")
    spec = {"appspec.yaml": appspec_yaml('echo "START $EPOCHREALTIME"')}
    remote.commit(spec)
    env = service_env(redis_url, root / "state", 3600, POSTDEPLOY_REPO=remote.url,
                      POSTDEPLOY_APP="bench", POSTDEPLOY_LOG_LEVEL="WARNING",
                      POSTDEPLOY_WEBHOOK_SECRET=SECRET)
    worker = Service(["-m", "worker"], env, root / "worker.log")
    # The service's default process count here, and one process: each against the bare
    # server with as many processes, so that like is compared with like.
    counts = sorted({default_count(), 1}, reverse=True)
    servers: list[tuple[Server, Server, Server]] = []
    for count in counts:
        port = free_port()
        hook = Service(["-m", "postdeploy.cli", "webhook", "--port", str(port),
                        "--processes", str(count)], env, root / f"webhook-{count}.log")
        floors = []
        for kind, label in (("bare", "bare Tornado server"), ("web", "bare tornado.web app")):
            floor_port = free_port()
            floor = Service(["-m", "bench.webhook", str(floor_port), str(count), kind], env,
                            root / f"floor-{kind}-{count}.log", cwd=REPO_ROOT)
            floors.append(Server(f"{label}, {_processes(count)}", floor, floor_port))
        servers.append((Server(_processes(count), hook, port), floors[0], floors[1]))
    everything = [server for group in servers for server in group]
    try:
        wait_ready(worker, client)
        for server in everything:
            wait_for(lambda s=server: _answers(s.port) or not s.service.alive(), 60,
                     what="the webhook service")
            if not server.service.alive():
                raise RuntimeError(f"{server.service.log_path.name} exited:\n"
                                   f"{server.service.log()[-2000:]}")
        port = servers[0][0].port
        assert _push(port, remote) == 202
        _job_start(store, remote.head())  # warm: the worker's first clone
        latencies = []
        for index in range(commits):
            sha = remote.commit({**spec, "n": str(index)})
            t0 = time.time()
            assert _push(port, remote) == 202
            latencies.append((_job_start(store, sha) - t0) * 1000)
        _answer_times(everything, remote, deliveries, rounds)
    finally:
        for server in reversed(everything):
            server.service.stop()
        worker.stop()
    p50, p95 = median(latencies), percentile(latencies, 95)
    wait_mean, wait_p95 = POLL_INTERVAL / 2 * 1000, POLL_INTERVAL * 0.95 * 1000
    rows = [
        Row("commit -> job start through the webhook p50", p50, wait_mean, "ms",
            "poll at 30 s: mean wait", f"<= {LATENCY_TARGET_MS:g} ms",
            p50 <= LATENCY_TARGET_MS),
        Row("commit -> job start through the webhook p95", p95, wait_p95, "ms",
            "poll at 30 s: p95 wait"),
    ]
    for index, (ours, bare, web) in enumerate(servers):
        load = f"{deliveries} concurrent deliveries, {ours.label}"
        p99 = percentile(ours.times, 99)
        target = index == 0  # the target is for the service as it runs by default
        rows += [
            Row(f"webhook answer time p99, {load}", p99, percentile(bare.times, 99), "ms",
                f"{bare.label}, same load", f"<= {ANSWER_TARGET_MS:g} ms" if target else "",
                p99 <= ANSWER_TARGET_MS if target else None),
            Row(f"webhook answer time p50, {load}", median(ours.times), median(bare.times),
                "ms", f"{bare.label}, same load"),
            Row(f"webhook: all {load} answered (median of rounds)", median(ours.walls),
                median(bare.walls), "ms", bare.label),
            Row(f"webhook CPU per delivery under that load, {ours.label}",
                ours.cpu_per_delivery(), bare.cpu_per_delivery(), "ms", bare.label),
            Row(f"tornado.web answer time p99, {deliveries} concurrent requests, "
                f"{web.label}", percentile(web.times, 99), percentile(bare.times, 99), "ms",
                f"{bare.label}, same load"),
            Row(f"tornado.web CPU per request under that load, {web.label}",
                web.cpu_per_delivery(), bare.cpu_per_delivery(), "ms", bare.label),
        ]
    return rows


def _processes(count: int) -> str:
    return f"{count} process" + ("es" if count > 1 else "")


def _burst(port: int, payload: dict[str, object], deliveries: int) -> list[float]:
    requests = []
    for _ in range(deliveries):
        body, headers = signed("github", SECRET, payload)
        requests.append(raw_request("/hooks/github", body, headers))
    answers = post_concurrently(port, requests)
    assert [status for status, _ in answers] == [202] * deliveries, answers
    return [took * 1000 for _, took in answers]


def _answer_times(servers: list[Server], remote: GitRemote, deliveries: int,
                  rounds: int) -> None:
    """Bursts at each server in turn, round after round, so all see the same machine."""
    payload = github_push("bench/app", after=remote.head())
    payload["repository"]["clone_url"] = remote.url
    for server in servers:  # warm: first connections, first publish
        _burst(server.port, payload, deliveries)
    for _ in range(rounds):
        for server in servers:
            processes = process_tree(server.service)
            before = tree_cpu(processes)
            times = _burst(server.port, payload, deliveries)
            server.cpu += tree_cpu(processes) - before
            server.walls.append(max(times))  # from the first request sent to the last answer
            server.times += times


def serve_floor(port: int, processes: int, kind: str) -> int:
    """The baseline server: Tornado's HTTP server with the service's settings, answering
    202 to every request as soon as its body is in, without looking at it; in as many
    processes sharing the port as the service runs. ``kind`` "web": the same answer
    from a ``tornado.web`` handler."""
    import tornado.httpserver
    import tornado.web
    from tornado import httputil

    from postdeploy.webhook.processes import listen_sockets, run_servers, stop_event
    from postdeploy.webhook.service import BODY_TIMEOUT, READ_LIMIT

    answer = b'{"status": "queued", "apps": []}'

    class Bare(httputil.HTTPMessageDelegate):
        def __init__(self, connection: httputil.HTTPConnection) -> None:
            self.connection = connection

        def finish(self) -> None:
            headers = httputil.HTTPHeaders({"Content-Type": "application/json",
                                            "Content-Length": str(len(answer))})
            self.connection.write_headers(httputil.ResponseStartLine("", 202, "Accepted"),
                                          headers, answer)
            self.connection.finish()

    class Server(httputil.HTTPServerConnectionDelegate):
        def start_request(self, server_conn: object,
                          request_conn: httputil.HTTPConnection) -> httputil.HTTPMessageDelegate:
            return Bare(request_conn)

    class Accept(tornado.web.RequestHandler):
        def prepare(self) -> None:
            self.set_status(202)
            self.set_header("Content-Type", "application/json")
            self.finish(answer)

    app = tornado.web.Application([(r"/.*", Accept)]) if kind == "web" else Server()

    async def run(sockets: list[socket.socket]) -> None:
        tornado.httpserver.HTTPServer(app, max_body_size=READ_LIMIT,
                                      max_buffer_size=READ_LIMIT, body_timeout=BODY_TIMEOUT,
                                      idle_connection_timeout=60).add_sockets(sockets)
        await stop_event().wait()

    def serve(sockets: list[socket.socket]) -> int:
        asyncio.run(run(sockets))
        return 0

    return run_servers(listen_sockets("127.0.0.1", port, processes), serve)


if __name__ == "__main__":
    sys.exit(serve_floor(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]))
