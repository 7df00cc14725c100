"""`python -m bench [--quick]`: measure postdeploy against its floors; print one table."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from bench import footprint, idle_checks, jobs, output_capture, webhook
from bench.harness import redis_server
from bench.report import Row, render


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="smaller sizes, under two minutes (the full run takes longer)")
    parser.add_argument("--only", choices=["checks", "latency", "overhead", "output",
                                           "footprint", "webhook"], action="append",
                        help="run only these measures (repeatable)")
    parser.add_argument("--apps", type=int, action="append",
                        help="fleet sizes for the idle check measure (repeatable)")
    parser.add_argument("--jobs", type=int, help="jobs for the per-job overhead measure")
    args = parser.parse_args()
    only = set(args.only or ["checks", "latency", "overhead", "output", "footprint",
                             "webhook"])
    rows: list[Row] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="postdeploy-bench-") as tmp:
        root = Path(tmp)
        with redis_server(root) as server:
            if "checks" in only:
                sizes = args.apps or ([1, 100] if args.quick else [1, 100, 1000])
                for count in sizes:
                    print(f"... idle checks, {count} apps", file=sys.stderr, flush=True)
                    rows += idle_checks.measure(root / f"checks-{count}", server.url, count,
                                                repeats=3 if args.quick else 5)
            if "latency" in only:
                print("... trigger latency", file=sys.stderr, flush=True)
                rows += jobs.measure_latency(root / "latency", server.url,
                                             20 if args.quick else 60)
            if "webhook" in only:
                print("... push trigger (webhook)", file=sys.stderr, flush=True)
                rows += webhook.measure(root / "webhook", server.url, 20 if args.quick else 60)
            if "overhead" in only:
                print("... per-job overhead", file=sys.stderr, flush=True)
                rows += jobs.measure_overhead(root / "overhead", server.url,
                                              args.jobs or (50 if args.quick else 200))
            if "output" in only:
                size = (256 if args.quick else 1024) * 1024 * 1024
                print(f"... output, {size >> 20} MiB", file=sys.stderr, flush=True)
                rows += output_capture.measure(root / "output", server.url, size)
        if "footprint" in only:
            print("... footprint of `postdeploy up`", file=sys.stderr, flush=True)
            rows += footprint.measure(root / "footprint", 15 if args.quick else 60)
    print(render(rows))
    print(f"\n({'quick' if args.quick else 'full'} run, {time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
