"""Smoke run of the benchmark harness: it runs and prints its table (figures are not asserted)."""

from __future__ import annotations

import subprocess
import sys

from tests.support.core import REPO_ROOT


def test_bench_quick_subset_prints_a_table_of_rounds() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "overhead", "--only", "checks",
         "--jobs", "5", "--apps", "20"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("| measure")
    (overhead,) = [line for line in lines if "per-job overhead added" in line]
    (cpu,) = [line for line in lines if "idle check cycle, 20 apps: CPU per app" in line]
    assert "–" in overhead and "–" in cpu  # median (min–max) over the rounds
    assert "median of 3 rounds" in result.stdout


def test_bench_refuses_fewer_than_three_rounds() -> None:
    result = subprocess.run([sys.executable, "-m", "bench", "--rounds", "2"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "at least 3" in result.stderr
