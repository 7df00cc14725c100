"""4. Output: a job writing 1 GiB through a real worker, against `cat` of the same bytes.

Throughput is bytes over the time from the job's start (its first command notes
the time) to the run's end (output drained, tail and record stored); checkout and
the other fixed costs of a run are the per-job overhead's row. Memory is the
growth of the worker's main and pool processes together (RSS sampled every 20
ms, each at its peak) over their size before the run. Baseline: the job's same
bytes piped to `cat > /dev/null` instead of to postdeploy, through a pipe of the
size postdeploy gives its jobs (a pipe is the floor of any capture). For scale,
a shell's `cat FILE | cat` (the default 64 KiB pipe) and `cat FILE > /dev/null`
are shown too: the latter copies nothing through a pipe, so no capture can
approach it.
Each round runs the job once and each baseline once, taking turns going first.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import time
from pathlib import Path

import redis

from bench.harness import (
    GitRemote,
    Service,
    celery_client,
    in_rounds,
    service_env,
    wait_ready,
)
from bench.report import Row
from postdeploy.run.runner import PIPE_SIZE
from postdeploy.store.state import StateStore
from tests.support.core import RssSampler, appspec_yaml

MIB = 1024 * 1024


def _write_file(path: Path, size: int) -> None:
    line = b"x" * 99 + b"\n"
    block = line * (MIB // len(line))
    with open(path, "wb") as handle:
        written = 0
        while written < size:
            handle.write(block)
            written += len(block)


def measure(root: Path, redis_url: str, size: int, rounds: int) -> list[Row]:
    root.mkdir(parents=True, exist_ok=True)
    data = root / "output.txt"
    _write_file(data, size)
    size = data.stat().st_size
    mib = size / MIB
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    store = StateStore(client)
    remote = GitRemote(root / "git", "bench")
    # The job (the job user, when we run as root) writes its start time here.
    shared = root / "shared"
    shared.mkdir(exist_ok=True)
    shared.chmod(0o1777)
    job_start = shared / "job-start"
    command = f"echo $EPOCHREALTIME > {job_start}; cat {data}"
    sha = remote.commit({"appspec.yaml": appspec_yaml(command, timeout="3600")})
    env = service_env(redis_url, root / "state", 3600, POSTDEPLOY_REPO=remote.url,
                      POSTDEPLOY_APP="bench", POSTDEPLOY_LOG_LEVEL="WARNING")
    worker = Service(["-m", "worker"], env, root / "worker.log")
    from postdeploy.services.tasks import run_job

    def ours() -> dict[str, float]:
        with RssSampler(worker.proc.pid, every=0.02) as rss:
            result = run_job.apply_async(kwargs={"app": "bench", "sha": sha}).get(timeout=3600)
        record = store.get_run(result["run_id"])
        assert record and record.started_at and record.finished_at
        tail, total = store.read_output(record.id)
        assert total == size and len(tail) <= 1024 * 1024, (total, len(tail))
        started = float(job_start.read_text())
        return {"ours": mib / (record.finished_at - started),
                "growth": rss.total_growth_mib}

    def pipe() -> dict[str, float]:
        return {"pipe": mib / _piped(data),
                "shell pipe": mib / _timed(f"cat {data} | cat > /dev/null"),
                "no pipe": mib / _timed(f"cat {data} > /dev/null")}

    try:
        wait_ready(worker, client)
        celery_client(redis_url, root / "state", POSTDEPLOY_REPO=remote.url,
                      POSTDEPLOY_APP="bench")
        figures = in_rounds(rounds, ours, pipe)
    finally:
        worker.stop()
    label = f"output {size // MIB} MiB"
    return [
        Row(f"{label}: capture throughput", figures["ours"], figures["pipe"], "MiB/s",
            "job | cat > /dev/null, same pipe size", ">= 0.8x baseline",
            lambda r: (r.ratio or 0) >= 0.8),
        Row(f"{label}: vs a shell pipe", figures["ours"], figures["shell pipe"], "MiB/s",
            "cat FILE | cat > /dev/null, 64 KiB pipe"),
        Row(f"{label}: vs reading the file, no pipe", figures["ours"], figures["no pipe"],
            "MiB/s", "cat FILE > /dev/null"),
        Row(f"{label}: worker memory growth", figures["growth"], None, "MiB", "",
            "<= 50 MiB", lambda r: r.value <= 50),
    ]


def _piped(data: Path) -> float:
    """Seconds for `cat FILE | cat > /dev/null` through a pipe as large as the job's."""
    read_end, write_end = os.pipe()
    with contextlib.suppress(OSError):
        fcntl.fcntl(read_end, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    t0 = time.perf_counter()
    with subprocess.Popen(["cat", "--", str(data)], stdout=write_end) as source, \
            subprocess.Popen(["cat"], stdin=read_end, stdout=subprocess.DEVNULL) as sink:
        os.close(write_end)
        os.close(read_end)
        source.wait()
        sink.wait()
    return time.perf_counter() - t0


def _timed(command: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(["bash", "-c", command], check=True)
    return time.perf_counter() - t0
