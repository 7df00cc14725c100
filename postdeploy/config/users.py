"""Job user settings: ``user:`` (a name or uid:gid) and POSTDEPLOY_JOB_UIDS, checked at load.

Which user each app's job runs as, and why, is :mod:`postdeploy.run.user`'s.
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass

from postdeploy.errors import ConfigError

# (uid_t)-1 tells setuid() "no change", so it is nobody's uid; 65534 is nobody itself.
MAX_UID = 4_294_967_294
DEFAULT_JOB_UIDS = (61184, 65519)  # systemd's DynamicUser range: no distribution uses it


@dataclass(frozen=True)
class JobUser:
    """A uid and gid to run a job as; ``name`` and ``home`` only for a passwd user."""

    uid: int
    gid: int
    name: str | None = None
    home: str | None = None  # the passwd entry's home directory, when it exists

    def describe(self) -> str:
        if self.name is None:
            return f"uid {self.uid} (gid {self.gid})"
        return f"{self.name} (uid {self.uid}, gid {self.gid})"


def parse_user(value: object, where: str) -> JobUser:
    """``name`` or ``uid:gid`` as a JobUser; ConfigError (one line, with the fix) otherwise."""
    text = str(value).strip()
    fix = "give a user name that exists on this host, or uid:gid (numbers, not 0)"
    if ":" in text:
        uid_text, _, gid_text = text.partition(":")
        if not (uid_text.isdigit() and gid_text.isdigit()):
            raise ConfigError(f"{where}: {text!r} is not a user name or uid:gid; {fix}")
        uid, gid = int(uid_text), int(gid_text)
        if not (0 < uid <= MAX_UID and 0 < gid <= MAX_UID):
            if uid == 0 or gid == 0:
                raise ConfigError(f"{where}: {text!r} is root; jobs must run as an "
                                  "unprivileged user (give another uid:gid)")
            raise ConfigError(f"{where}: {text!r} is out of range; uid and gid must be "
                              f"1 to {MAX_UID}")
        return passwd_user(uid, gid)
    if not text or text.isdigit():
        raise ConfigError(f"{where}: {text!r} is not a user name or uid:gid; {fix}")
    try:
        entry = pwd.getpwnam(text)
    except KeyError:
        raise ConfigError(f"{where}: no user {text!r} on this host; create it "
                          f"(useradd {text}) or give uid:gid") from None
    if entry.pw_uid == 0 or entry.pw_gid == 0:
        raise ConfigError(f"{where}: {text!r} is root; jobs must run as an unprivileged "
                          "user (create one: useradd shop)")
    return passwd_user(entry.pw_uid, entry.pw_gid)


def passwd_user(uid: int, gid: int) -> JobUser:
    """``uid:gid`` with the name and home of uid's passwd entry, when it has one."""
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return JobUser(uid, gid)
    home = entry.pw_dir if entry.pw_dir and os.path.isdir(entry.pw_dir) else None
    return JobUser(uid, gid, entry.pw_name, home)


def parse_uid_range(value: str | None, where: str = "POSTDEPLOY_JOB_UIDS") -> tuple[int, int]:
    """``LOW-HIGH`` uids for apps of their own; ConfigError for anything else."""
    if value is None or not value.strip():
        return DEFAULT_JOB_UIDS
    low_text, dash, high_text = value.strip().partition("-")
    if not (dash and low_text.strip().isdigit() and high_text.strip().isdigit()):
        raise ConfigError(f"invalid {where}: {value!r}; give a range of uids like "
                          f"{DEFAULT_JOB_UIDS[0]}-{DEFAULT_JOB_UIDS[1]}")
    low, high = int(low_text), int(high_text)
    if not 0 < low <= high <= MAX_UID:
        raise ConfigError(f"invalid {where}: {value!r}; LOW-HIGH with 1 <= LOW <= HIGH <= "
                          f"{MAX_UID}")
    return low, high
