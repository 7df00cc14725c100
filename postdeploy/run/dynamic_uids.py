"""A uid of its own for each app that names no user (DynamicUser-style), kept per host.

The uid is first tried at a spot derived from the app's name, so it rarely changes,
and recorded in the state dir (``job-uids.json``, under a file lock shared by every
worker of this host) so that two apps never get the same one, whatever order they
are first run in. A uid that belongs to a passwd user or group, or that another app
runs as, is never given out. The gid is the same number.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import json
import os
import pwd
import zlib
from collections.abc import Iterator
from pathlib import Path

from postdeploy.errors import JobUserError

UIDS_FILE = "job-uids.json"  # in the state dir: app name (lower case) -> uid
LOCK_FILE = "job-uids.lock"


def dynamic_uid(state_dir: Path, app: str, uid_range: tuple[int, int],
                taken: set[int]) -> int:
    """The app's uid, allocating and recording it on first use. JobUserError when full."""
    with _locked(state_dir):
        table = _read(state_dir)
        key = app.lower()
        uid = table.get(key)
        others = {u for name, u in table.items() if name != key}
        if uid is None or not _free(uid, uid_range, taken | others):
            uid = _first_free(key, uid_range, taken | others)
            table[key] = uid
            _write(state_dir, table)
        return uid


def peek_uid(state_dir: Path, app: str, uid_range: tuple[int, int],
             taken: set[int]) -> int | None:
    """The app's recorded uid, if it still holds; nothing is written."""
    try:
        uid = _read(state_dir).get(app.lower())
    except OSError:
        return None
    return uid if uid is not None and _free(uid, uid_range, taken) else None


def _first_free(key: str, uid_range: tuple[int, int], taken: set[int]) -> int:
    low, high = uid_range
    size = high - low + 1
    start = zlib.crc32(key.encode()) % size
    for step in range(min(size, 1_000_000)):
        uid = low + (start + step) % size
        if _free(uid, uid_range, taken):
            return uid
    raise JobUserError(f"no free uid left in POSTDEPLOY_JOB_UIDS {low}-{high} for app "
                       f"{key!r}; widen the range or give the app a user: in postdeploy.yaml")


def _free(uid: int, uid_range: tuple[int, int], taken: set[int]) -> bool:
    if not uid_range[0] <= uid <= uid_range[1] or uid in taken:
        return False
    # A real user or group of that number would share its files and processes.
    for lookup in (pwd.getpwuid, grp.getgrgid):
        try:
            lookup(uid)
            return False
        except KeyError:
            pass
    return True


def _read(state_dir: Path) -> dict[str, int]:
    try:
        data = json.loads((state_dir / UIDS_FILE).read_text())
    except FileNotFoundError:
        return {}
    except (ValueError, UnicodeDecodeError):
        return {}  # a torn or edited file: allocate afresh, the same spots come first
    if not isinstance(data, dict):
        return {}
    return {str(k): v for k, v in data.items() if isinstance(v, int)}


def _write(state_dir: Path, table: dict[str, int]) -> None:
    temp = state_dir / f"{UIDS_FILE}.tmp"
    temp.write_text(json.dumps(table, sort_keys=True, indent=1) + "\n")
    os.replace(temp, state_dir / UIDS_FILE)


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / LOCK_FILE, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
