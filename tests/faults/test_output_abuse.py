"""Jobs that abuse their output: 1 GiB of lines, a 100 MB line, binary bytes.

The worker's pool processes keep a flat memory (sampled with psutil during each run),
the stored tail stays within its cap, and the service keeps going.
"""

from __future__ import annotations

from collections.abc import Callable

from postdeploy.store.state import StateStore
from tests.faults.conftest import Executor, FaultScope
from tests.faults.harness import audit
from tests.support.core import (
    GitRemote,
    RssSampler,
    appspec_yaml,
    runs,
    wait_for,
)

LIMIT = 256 * 1024  # POSTDEPLOY_OUTPUT_LIMIT for this test: the tail kept per run
RSS_GROWTH_MAX = 64.0  # MiB a pool process may grow while a job prints gigabytes
GIB = 2**30
CASES = [
    # name, command, bytes printed, seconds allowed
    ("1 GiB of 100-byte lines", "head -c 1G /dev/zero | tr '\\0' 'a' | fold -w 100",
     GIB, 60),
    ("a 100 MB line without newline", "head -c 100M /dev/zero | tr '\\0' 'b'",
     100 * 2**20, 30),
    ("50 MB of binary bytes", "head -c 50M /dev/urandom", 50 * 2**20, 30),
    ("`yes` for 256 MB", "yes | head -c 256M", 256 * 2**20, 30),
]


def test_output_abuse(remote: GitRemote, executor: Callable[..., Executor],
                      fault: FaultScope, report: Callable[[str], None]) -> None:
    shas = [remote.commit({"appspec.yaml": appspec_yaml("echo warm-up")})]
    started = executor(wait_ready=True, POSTDEPLOY_OUTPUT_LIMIT=str(LIMIT),
                       POSTDEPLOY_CONCURRENCY="1")
    client, worker = started.client, started.worker
    store = StateStore(client)
    wait_for(lambda: any(r.status == "succeeded" for r in runs(client, "shop")), 40,
             what="the warm-up run")

    for name, command, printed, allowed in CASES:
        with fault(f"output abuse: {name}") as f:
            with RssSampler(worker.proc.pid) as rss:
                shas.append(remote.commit({"appspec.yaml": appspec_yaml(command)}, name))
                record = wait_for(lambda: next(
                    (r for r in runs(client, "shop") if r.sha == shas[-1]
                     and r.status not in ("queued", "running")), None), allowed + 30,
                    what=f"the run printing {name}")
            assert record.status == "succeeded", record.reason
            tail, total = store.read_output(record.id)
            assert len(tail) <= LIMIT
            # Counted after line splitting: fold's newlines (1 per 100 bytes) and the
            # newlines that cut over-long lines into pieces are included.
            assert printed <= total <= printed * 1.011 + 1, total
            duration = record.duration or 0.0
            report(f"output abuse, {name}: {total / 2**20:.0f} MiB in {duration:.1f} s; "
                   f"worker peak RSS {rss.peak_mib:.0f} MiB, largest growth "
                   f"{rss.growth_mib:.1f} MiB; stored tail {len(tail) // 1024} KiB")
            assert duration < allowed
            assert rss.growth_mib < RSS_GROWTH_MAX
            assert worker.alive()
            f.audit = audit(client, "shop", shas)

    shas.append(remote.commit({"appspec.yaml": appspec_yaml("echo still-fine")}, "after"))
    wait_for(lambda: any(r.sha == shas[-1] and r.status == "succeeded"
                         for r in runs(client, "shop")), 40, what="a normal run after")
