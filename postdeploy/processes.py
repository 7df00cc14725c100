"""Finding a job's processes on this host through /proc (Linux).

A job may leave its process group (setsid, daemons), but it cannot shed the
environment it inherited: a marker variable finds every process it started.
Zombies are left out: they run nothing and vanish once reaped.
"""

from __future__ import annotations

import os
from pathlib import Path


def processes_with_env(name: str, value: str) -> list[int]:
    """Live processes other than us whose environment holds ``name=value``."""
    marker = f"{name}={value}".encode()
    found = []
    for pid in _pids():
        try:
            if marker not in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                continue
        except OSError:
            continue
        if _state(pid) not in (None, "Z"):
            found.append(pid)
    return found


def live_in_group(pgid: int) -> list[int]:
    """Live members of process group ``pgid``."""
    alive = []
    for pid in _pids():
        fields = _stat_fields(pid)
        if fields and len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
            alive.append(pid)
    return alive


def _pids() -> list[int]:
    me = os.getpid()
    return [int(e) for e in os.listdir("/proc") if e.isdigit() and int(e) != me]


def _state(pid: int) -> str | None:
    fields = _stat_fields(pid)
    return fields[0] if fields else None


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (which may hold spaces)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except OSError:
        return None
