"""Smoke run of the benchmark harness: it runs and prints its table (figures are not asserted)."""

from __future__ import annotations

import subprocess
import sys

from tests.support import REPO_ROOT


def test_bench_quick_subset_prints_a_table() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "overhead", "--only", "checks",
         "--jobs", "10", "--apps", "20"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("| measure")
    assert any("per-job overhead added" in line for line in lines)
    assert any("idle check cycle, 20 apps: CPU per app" in line for line in lines)
