"""Checks of single setting values, each failing with one exact ConfigError line.

config.py decides where a value comes from; this module decides whether it is
usable: numbers in range, Redis URLs, app and branch names, the state directory.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from redis.connection import parse_url

from postdeploy.config.redaction import redact_url
from postdeploy.errors import ConfigError

APP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
# git check-ref-format's rules for a branch, so a name never reaches git as an option.
_BAD_BRANCH = re.compile(r"(^[-/.])|\.\.|@\{|//|[\x00-\x20\x7f~^:?*\[\\]|(\.lock|[/.])$")
_REDIS_SCHEMES = ("redis", "rediss", "unix")


def check_app_name(name: str, where: str) -> None:
    """A name safe as a directory and beside its lock file ("<name>.lock") in the state dir."""
    if not APP_NAME.match(name) or name.lower().endswith(".lock"):
        raise ConfigError(f"{where}: {name!r} is not a valid app name (letters, digits, "
                          "'.', '_', '-', starting with a letter or digit, not ending in "
                          "'.lock'; at most 63)")


def check_branch(branch: str, where: str) -> None:
    """A name git accepts as a branch and never reads as an option."""
    if _BAD_BRANCH.search(branch):
        raise ConfigError(f"{where}: {branch!r} is not a valid branch name "
                          "(see `git check-ref-format --branch`)")


def number_in_range(value: Any, name: str, default: float, low: float, high: float,
                    integer: bool = False) -> float:
    """``value`` as a positive number within [low, high]; ``default`` when not given."""
    if value is None or value == "":
        return default
    text = str(value).strip()
    kind = "a positive integer" if integer else "a positive number of seconds"
    try:
        number = int(text) if integer else float(text)
    except ValueError:
        raise ConfigError(f"invalid {name}: {text!r} is not {kind}") from None
    if not number > 0 or math.isnan(number) or math.isinf(number):
        raise ConfigError(f"invalid {name}: {text!r} is not {kind}")
    if not low <= number <= high:
        unit = "" if integer else " seconds"
        span = f"{low:.0f} to {high:.0f}" if integer else f"{low:g} to {high:g}"
        if low <= 0:  # "0 to N" would suggest that 0 itself is fine
            span = f"at most {high:.0f}" if integer else f"at most {high:g}"
        raise ConfigError(f"invalid {name}: {text!r} is out of range; use {span}{unit}")
    return number


def check_redis_url(value: str, where: str = "POSTDEPLOY_REDIS_URL") -> str:
    """The URL if kombu and redis-py will both read it as meant; else ConfigError.

    They parse the URL separately and fail late (db ``x``: a worker traceback,
    then exit 0; port 99999: a ValueError deep in redis-py), so check it here.
    """
    text = value.strip()
    shown = redact_url(text)
    # No "user:password@" in the hint: the CLI masks whatever looks like credentials.
    expected = "expected redis://host:port/db, rediss://host:port/db or unix:///path/to/socket"
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise ConfigError(f"invalid {where}: {shown!r} has a port that is not a TCP port "
                          f"(1-65535); {expected}") from None
    scheme = parts.scheme.lower()
    if scheme not in _REDIS_SCHEMES or "://" not in text:
        raise ConfigError(f"invalid {where}: {shown!r}; {expected}")
    if port == 0:
        raise ConfigError(f"invalid {where}: {shown!r} has port 0, not a TCP port "
                          f"(1-65535); {expected}")
    db_values = parse_qs(parts.query).get("db", [])
    if scheme == "unix":
        if not parts.path:
            raise ConfigError(f"invalid {where}: {shown!r} names no socket path; {expected}")
    else:
        path = parts.path.strip("/")
        if "/" in path:
            raise ConfigError(f"invalid {where}: {shown!r} has more than a db number "
                              f"after the address; {expected}")
        db_values.insert(0, path)
    for db in db_values:
        if db and not (db.isascii() and db.isdigit()):
            raise ConfigError(f"invalid {where}: {shown!r} has db {db!r}, which is not a "
                              f"number (0, 1, ...); {expected}")
    try:
        # redis-py's own reading, for its query options (?socket_timeout=...).
        parse_url(text)  # type: ignore[no-untyped-call]
    except ValueError as exc:
        raise ConfigError(f"invalid {where}: {shown!r}: {exc}") from None
    return text


def refuse_password_flag(value: str) -> None:
    """--redis-url with a password: ConfigError (any process on the host, a job too,
    can read another's command line in /proc/PID/cmdline)."""
    parts = urlsplit(value.strip())
    if parts.password or "password" in parse_qs(parts.query):
        raise ConfigError("--redis-url carries a password, which any process on this host "
                          "can read from the command line; set POSTDEPLOY_REDIS_URL, or "
                          "put the URL in a file only you can read and pass --redis-url-file "
                          "FILE")


def read_redis_url_file(path: str) -> str:
    """The URL in ``path`` (--redis-url-file); ConfigError when it cannot be read."""
    try:
        text = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"--redis-url-file {path}: cannot read it ({reason}); give a file "
                          "holding one Redis URL") from None
    if not text:
        raise ConfigError(f"--redis-url-file {path} is empty; put one Redis URL in it")
    return check_redis_url(text, f"the URL in --redis-url-file {path}")


def state_dir_path(value: Any, where: str) -> Path:
    path = Path(str(value)).expanduser().absolute()
    # The nearest part that exists must be a directory, or nothing can be made below it.
    try:
        existing = next((p for p in (path, *path.parents) if p.exists()), None)
    except OSError as exc:  # a name too long, a loop of symlinks, no permission
        raise ConfigError(f"invalid {where}: {str(path)!r} cannot be used ({exc.strerror}); "
                          "give a directory for postdeploy's state") from None
    if existing is not None and not existing.is_dir():
        raise ConfigError(f"invalid {where}: {str(existing)!r} is a file, not a directory; "
                          "give a directory for postdeploy's state")
    return path


def make_state_dir(path: Path) -> Path:
    """Create the state directory if needed and prove this user can write there."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except FileExistsError:
        raise ConfigError(f"cannot create the state directory {str(path)!r}: a part of "
                          "the path is a broken symlink or not a directory; fix it, or set "
                          "POSTDEPLOY_STATE_DIR (--state-dir) to another directory") from None
    except OSError as exc:
        raise ConfigError(f"cannot write to the state directory {str(path)!r} "
                          f"({exc.strerror}); fix its permissions, or set "
                          "POSTDEPLOY_STATE_DIR (--state-dir) to a directory this user "
                          "can write") from None
    return path
