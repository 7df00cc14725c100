"""6. One `git ls-remote`: its CPU cost through GitPython's `Git.execute` against
a plain `subprocess.run` of the same command, both with a timeout as postdeploy
uses them.

Both run in this process against the same local bare repository, ``calls`` times
per round, taking turns going first. CPU is this process's own plus its reaped
children's (getrusage), per call: what a check of one app pays for launching git.
"""

from __future__ import annotations

import resource
import subprocess
from pathlib import Path

from bench.harness import bare_repos, in_rounds
from bench.report import Row

TIMEOUT = 30  # seconds; postdeploy passes a timeout, which costs GitPython a watchdog


def _cpu_seconds() -> float:
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def measure(root: Path, calls: int, rounds: int) -> list[Row]:
    import git  # GitPython

    root.mkdir(parents=True, exist_ok=True)
    repos, _ = bare_repos(root, 1)
    command = ["git", "ls-remote", "--", str(repos[0]), "HEAD"]
    gitpython = git.cmd.Git()

    def through_gitpython() -> dict[str, float]:
        cpu0 = _cpu_seconds()
        for _ in range(calls):
            gitpython.execute(command, kill_after_timeout=TIMEOUT)
        return {"gitpython": (_cpu_seconds() - cpu0) / calls * 1000}

    def plain() -> dict[str, float]:
        cpu0 = _cpu_seconds()
        for _ in range(calls):
            subprocess.run(command, capture_output=True, check=True, timeout=TIMEOUT)
        return {"plain": (_cpu_seconds() - cpu0) / calls * 1000}

    through_gitpython(), plain()  # warm: imports, page cache
    figures = in_rounds(rounds, through_gitpython, plain)
    return [Row("git ls-remote via GitPython Git.execute (with a timeout): CPU per call",
                figures["gitpython"], figures["plain"], "ms", "subprocess.run")]
