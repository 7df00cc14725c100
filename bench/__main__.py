"""`python -m bench [--quick]`: measure postdeploy against its floors in rounds; one table."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench import footprint, git_calls, idle_checks, instances, jobs, output_capture, webhook
from bench.harness import redis_server
from bench.report import Row, render

MIN_ROUNDS = 3  # a single round says nothing about the spread


@dataclass(frozen=True)
class Run:
    """What a measure needs: where to work, the shared Redis, the options."""

    root: Path
    redis_url: str
    quick: bool
    rounds: int
    apps: list[int] | None
    jobs: int | None


def _checks(run: Run) -> list[Row]:
    rows: list[Row] = []
    for count in run.apps or ([1, 100] if run.quick else [1, 100, 1000]):
        _say(f"idle checks, {count} apps")
        rows += idle_checks.measure(run.root / f"checks-{count}", run.redis_url, count,
                                    run.rounds)
    return rows


def _latency(run: Run) -> list[Row]:
    return jobs.measure_latency(run.root / "latency", run.redis_url,
                                10 if run.quick else 20, run.rounds)


def _overhead(run: Run) -> list[Row]:
    return jobs.measure_overhead(run.root / "overhead", run.redis_url,
                                 run.jobs or (20 if run.quick else 70), run.rounds)


def _output(run: Run) -> list[Row]:
    size = (256 if run.quick else 1024) * 1024 * 1024
    return output_capture.measure(run.root / "output", run.redis_url, size, run.rounds)


def _webhook(run: Run) -> list[Row]:
    return webhook.measure(run.root / "webhook", run.redis_url, 20 if run.quick else 60,
                           rounds=run.rounds)


def _git(run: Run) -> list[Row]:
    return git_calls.measure(run.root / "git-calls", 50 if run.quick else 200, run.rounds)


def _instances(run: Run) -> list[Row]:
    return instances.measure(run.root / "instances", run.redis_url, 100, run.rounds,
                             quick=run.quick)


def _footprint(run: Run) -> list[Row]:
    return footprint.measure(run.root / "footprint", 5 if run.quick else 20, run.rounds)


# In the order they run; each takes a Run and returns its rows.
MEASURES: dict[str, tuple[str, Callable[[Run], list[Row]]]] = {
    "checks": ("idle checks", _checks),
    "latency": ("trigger latency", _latency),
    "overhead": ("per-job overhead", _overhead),
    "output": ("output capture", _output),
    "webhook": ("push trigger (webhook)", _webhook),
    "git": ("git ls-remote launch cost", _git),
    "instances": ("instance reports, 3 hosts", _instances),
    "footprint": ("footprint of `postdeploy up`", _footprint),
}


def _say(what: str) -> None:
    print(f"... {what}", file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="smaller sizes and windows (the full run takes longer)")
    parser.add_argument("--rounds", type=int, default=MIN_ROUNDS,
                        help=f"rounds per measure, at least {MIN_ROUNDS} (default)")
    parser.add_argument("--only", choices=list(MEASURES), action="append",
                        help="run only these measures (repeatable)")
    parser.add_argument("--apps", type=int, action="append",
                        help="fleet sizes for the idle check measure (repeatable)")
    parser.add_argument("--jobs", type=int, help="jobs per round for the per-job overhead")
    args = parser.parse_args()
    if args.rounds < MIN_ROUNDS:
        parser.error(f"--rounds must be at least {MIN_ROUNDS}")
    only = args.only or list(MEASURES)
    rows: list[Row] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="postdeploy-bench-") as tmp:
        # As root, jobs run as the job user: it must reach the checkouts below (not list).
        os.chmod(tmp, 0o711)
        with redis_server(Path(tmp)) as server:
            run = Run(Path(tmp), server.url, args.quick, args.rounds, args.apps, args.jobs)
            for name, (title, measure) in MEASURES.items():
                if name in only:
                    if name != "checks":  # it says which fleet size it is at
                        _say(title)
                    rows += measure(run)
    print(render(rows))
    print(f"\n(median of {args.rounds} rounds, min–max in brackets, ratio: median of the "
          f"per-round ratios; {'quick' if args.quick else 'full'} run, "
          f"{time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
