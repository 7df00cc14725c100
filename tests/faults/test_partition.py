"""Fencing under real network separation and a frozen host.

Workers run in network namespaces joined by a bridge (and each in its own PID
namespace), Redis in a namespace of its own, on a private subnet only they see
(tests/netns.py). A host is cut off silently (its bridge port disabled: no RST,
no ICMP) for longer than the lease, or frozen as a whole (SIGSTOP of every
process on it). The job journals its life with wall-clock stamps (one machine,
one clock) to a shared directory; a second copy must start only after the
first is dead, and the run records must tell what really happened.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import redis

from postdeploy.store import keys
from tests.faults.conftest import FaultScope
from tests.faults.harness import audit
from tests.support.core import REDIS_SERVER, GitRemote, appspec_yaml, runs, service_env, wait_for
from tests.support.netns import NetHost, Network, netns_work

LEASE = 5.0  # Settings.lock_ttl for a 1 s check interval
INTERVAL = 1.0
REDIS_PORT = 6379


def journal_job(journal: Path, seconds: float) -> str:
    """A job stamping start, alive (every 0.1 s), a SIGTERM it ignores, and end.

    It counts its own steps, not the clock: frozen, it has as much left to do after.
    """
    stamp = f'echo "$1 $POST_DEPLOY_RUN_ID $(date +%s.%N)" >> {journal}'
    return (f"note() {{ {stamp}; }}; note start; trap 'note term' TERM; "
            f"for i in $(seq {int(seconds * 10)}); do note alive; sleep 0.1; done; note end")


def stamps(journal: Path, run_id: str, kind: str | None = None) -> list[float]:
    if not journal.exists():
        return []
    found = []
    for line in journal.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] == run_id and kind in (None, parts[0]):
            found.append(float(parts[2]))
    return found


@dataclass
class Worker:
    host: NetHost
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def processes(self) -> list[psutil.Process]:
        """Every process on this host (below the namespace's `unshare`)."""
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return []

    def signal_all(self, sig: int, leaves_first: bool = False) -> None:
        found = self.processes()
        for proc in reversed(found) if leaves_first else found:
            try:
                proc.send_signal(sig)
            except psutil.Error:
                pass


@dataclass
class Partitioned:
    net: Network
    client: redis.Redis  # the test's own, through Redis' unix socket
    redis_url: str  # what the hosts use: TCP on the private subnet
    start: Callable[..., Worker]
    cli: Callable[..., subprocess.CompletedProcess[str]]  # `postdeploy ARGS` on a host


@pytest.fixture
def partitioned(tmp_path: Path, remote: GitRemote) -> Iterator[Partitioned]:
    if (why := netns_work()) is not None:
        pytest.skip(why)
    net = Network()
    started: list[Worker] = []
    redis_proc: subprocess.Popen[bytes] | None = None
    try:
        store = net.add("redis")
        socket_path = tmp_path / "redis.sock"
        redis_proc = subprocess.Popen(
            ["ip", "netns", "exec", store.netns, REDIS_SERVER, "--bind", store.address,
             "--port", str(REDIS_PORT), "--unixsocket", str(socket_path),
             "--unixsocketperm", "700", "--save", "", "--appendonly", "no",
             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        client = redis.Redis(unix_socket_path=str(socket_path))
        wait_for(lambda: socket_path.exists() and client.ping(), 15, what="Redis")
        url = f"redis://{store.address}:{REDIS_PORT}/0"

        def env_of(name: str) -> dict[str, str]:
            return service_env(url, tmp_path / name / "state", INTERVAL, POSTDEPLOY_HOST=name,
                               POSTDEPLOY_REPO=remote.url, POSTDEPLOY_APP="shop")

        def cli(name: str, *args: str) -> subprocess.CompletedProcess[str]:
            host = net.hosts.get(name) or net.add(name)
            return subprocess.run(["ip", "netns", "exec", host.netns, sys.executable, "-m",
                                   "postdeploy.cli", *args], env=env_of(name),
                                  capture_output=True, text=True, timeout=60)

        def start(name: str, *modules: str) -> Worker:
            host = net.hosts.get(name) or net.add(name)
            env = env_of(name)
            log_path = tmp_path / f"{name}.log"
            # Several services on one host: one PID namespace, under one shell.
            command = " & ".join(f"{sys.executable} -m {m}" for m in modules) + "; wait"
            with open(log_path, "ab") as log:
                proc = subprocess.Popen([*host.enter(), "sh", "-c", command], env=env,
                                        stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
            worker = Worker(host, proc, log_path)
            started.append(worker)
            wait_for(lambda: " ready." in worker.log(), 60, what=f"the worker on {name}")
            return worker

        yield Partitioned(net, client, url, start, cli)
    finally:
        for worker in started:
            worker.signal_all(signal.SIGCONT)
            try:
                os.killpg(worker.proc.pid, signal.SIGKILL)  # --kill-child: the host ends
            except ProcessLookupError:
                pass
            worker.proc.wait(20)
        if redis_proc is not None:
            redis_proc.kill()
            redis_proc.wait(10)
        net.close()


def running(client: redis.Redis, sha: str, journal: Path, host: str) -> str:
    def found() -> str | None:
        return next((r.id for r in runs(client, "shop") if r.sha == sha and r.host == host
                     and r.status == "running" and stamps(journal, r.id, "start")), None)
    return wait_for(found, 60, what=f"the job to run on {host}")


def status_of(client: redis.Redis, run_id: str) -> str | None:
    return next((str(r.status) for r in runs(client, "shop") if r.id == run_id), None)


def test_a_host_cut_off_silently_is_fenced_before_a_second_copy_starts(
        tmp_path: Path, remote: GitRemote, partitioned: Partitioned, fault: FaultScope,
        report: Callable[[str], None]) -> None:
    journal = tmp_path / "journal"
    sha = remote.commit({"appspec.yaml": appspec_yaml(journal_job(journal, 8))}, "one")
    net, client = partitioned.net, partitioned.client
    w1 = partitioned.start("w1", "worker", "beat")
    first = running(client, sha, journal, "w1")
    partitioned.start("w2", "worker", "beat")
    with fault("a host cut off from Redis silently mid-job, longer than the lease") as f:
        # About 1 s into the job (it stamps every 0.1 s).
        wait_for(lambda: len(stamps(journal, first, "alive")) >= 10, 30, what="1 s of the job")
        net.cut("w1")
        cut_at = time.time()
        second = wait_for(lambda: next((r.id for r in runs(client, "shop")
                                        if r.id != first and stamps(journal, r.id, "start")),
                                       None), 60, what="the second copy on w2")
        second_start = stamps(journal, second, "start")[0]
        wait_for(lambda: status_of(client, second) == "succeeded", 60,
                 what="the second copy to succeed")
        last_alive = max(stamps(journal, first))
        term = stamps(journal, first, "term")
        assert last_alive < second_start, (last_alive, second_start)
        net.heal("w1")
        # The cut-off worker learns its lease is gone; its late writes are refused.
        try:
            wait_for(lambda: "fencing token" in (tmp_path / "w1.log").read_text(), 90,
                     what="w1's late record to be refused")
        except AssertionError:
            for proc in w1.processes():
                wchan = Path(f"/proc/{proc.pid}/wchan").read_text()
                print(proc.pid, proc.name(), proc.ppid(), wchan)
            print([(r.id, r.status, r.host) for r in runs(client, "shop")])
            raise
        assert status_of(client, first) == "lost"
        assert stamps(journal, first, "end") == []
        assert term and term[0] - cut_at < LEASE / 2 + 1.0
        report(f"silent partition (lease {LEASE:g} s): SIGTERM {term[0] - cut_at:.2f} s and "
               f"last sign of life {last_alive - cut_at:.2f} s after the cut; the second "
               f"copy started {second_start - cut_at:.2f} s after it, "
               f"{second_start - last_alive:.2f} s after the first was dead")
        f.audit = audit(client, "shop", [sha])


def test_a_job_that_ends_as_its_host_is_cut_off_keeps_its_exit(
        tmp_path: Path, remote: GitRemote, partitioned: Partitioned) -> None:
    journal = tmp_path / "journal"
    go = tmp_path / "go"
    job = (f'echo "start $POST_DEPLOY_RUN_ID 0" >> {journal}; '
           f"while [ ! -e {go} ]; do sleep 0.05; done; exit 0")
    sha = remote.commit({"appspec.yaml": appspec_yaml(job)}, "one")
    net, client = partitioned.net, partitioned.client
    # A manual run and no beat: nothing queues the commit again while the host is away.
    partitioned.start("w1", "worker")
    queued = partitioned.cli("w1", "run", "shop", "--sha", sha)
    assert queued.returncode == 0, queued.stderr
    run_id = running(client, sha, journal, "w1")
    net.cut("w1")
    # The job ends on its own, inside the lease and before its guard would stop it,
    # while a renewal hangs (a guard blocked in a connect would call it lost later).
    time.sleep(1.6)
    go.touch()
    # The lease lapses meanwhile (its lock expires in Redis); nobody else takes it.
    wait_for(lambda: not client.exists(keys.run_lock("shop")), LEASE + 15,
             what="the cut-off run's lock to lapse")
    net.heal("w1")
    wait_for(lambda: status_of(client, run_id) not in ("running", None), 90,
             what="the run to be recorded")
    assert status_of(client, run_id) == "succeeded"


def test_a_frozen_host_does_not_run_beside_the_copy_that_replaced_it(
        tmp_path: Path, remote: GitRemote, partitioned: Partitioned, fault: FaultScope,
        report: Callable[[str], None]) -> None:
    journal = tmp_path / "journal"
    sha = remote.commit({"appspec.yaml": appspec_yaml(journal_job(journal, 8))}, "one")
    client = partitioned.client
    w1 = partitioned.start("w1", "worker", "beat")
    first = running(client, sha, journal, "w1")
    partitioned.start("w2", "worker", "beat")
    with fault("a whole host frozen (worker, guard, job) past the lease, then resumed") as f:
        w1.signal_all(signal.SIGSTOP)  # a VM pause: everything on the host at once
        frozen_at = time.time()
        partitioned.net.cut("w1")  # ...whose network comes back only after it resumes
        second = wait_for(lambda: next((r.id for r in runs(client, "shop")
                                        if r.id != first and stamps(journal, r.id, "start")),
                                       None), 60, what="the second copy on w2")
        second_start = stamps(journal, second, "start")[0]
        # The job resumes before its guard: the worst order a resume can take.
        resumed_at = time.time()
        w1.signal_all(signal.SIGCONT, leaves_first=True)
        time.sleep(2.0)
        partitioned.net.heal("w1")
        wait_for(lambda: status_of(client, second) == "succeeded", 60,
                 what="the second copy to succeed")
        after = [t for t in stamps(journal, first) if t > resumed_at]
        overlap = max(after) - resumed_at if after else 0.0
        assert status_of(client, first) == "lost"  # its late record was refused
        assert stamps(journal, first, "end") == []
        report(f"frozen host ({resumed_at - frozen_at:.1f} s, lease {LEASE:g} s): the "
               f"second copy started {second_start - frozen_at:.2f} s after the freeze; "
               f"after the resume the first copy wrote {len(after)} line(s), the last "
               f"{overlap * 1000:.0f} ms after it")
        assert overlap < 0.5
        f.audit = audit(client, "shop", [sha])
