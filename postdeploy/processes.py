"""Finding a job's processes on this host (psutil).

A job may leave its process group (setsid, daemons), but it cannot shed the
environment it inherited: a marker variable finds every process it started.
Zombies are left out: they run nothing and vanish once reaped.
"""

from __future__ import annotations

import os

import psutil


def processes_with_env(name: str, value: str) -> list[int]:
    """Live processes other than us whose environment holds ``name=value``."""
    found = []
    for proc in _others():
        try:
            if proc.environ().get(name) == value and _alive(proc):
                found.append(proc.pid)
        except (psutil.Error, OSError):
            continue  # gone meanwhile, or not ours to read
    return found


def live_in_group(pgid: int) -> list[int]:
    """Live members of process group ``pgid``."""
    alive = []
    for proc in _others():
        try:
            if os.getpgid(proc.pid) == pgid and _alive(proc):
                alive.append(proc.pid)
        except (psutil.Error, OSError):
            continue
    return alive


def _others() -> list[psutil.Process]:
    me = os.getpid()
    return [p for p in psutil.process_iter() if p.pid != me]


def _alive(proc: psutil.Process) -> bool:
    return bool(proc.status() != psutil.STATUS_ZOMBIE)
