"""Operator settings: read from POSTDEPLOY_* variables and postdeploy.yaml, in one place.

Everything else receives a :class:`Settings`; nothing else reads the environment.
"""

from __future__ import annotations

import math
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from postdeploy.config.checks import (
    check_app_name,
    check_branch,
    check_redis_url,
    number_in_range,
    read_redis_url_file,
    refuse_password_flag,
    state_dir_path,
)
from postdeploy.config.commit_status import CommitStatusConfig
from postdeploy.config.commit_status import parse_config as parse_commit_status
from postdeploy.config.notify import DEFAULT_NOTIFY_ON, parse_events, parse_urls
from postdeploy.config.redaction import redact_url
from postdeploy.config.users import parse_uid_range, parse_user
from postdeploy.errors import ConfigError

# POST_DEPLOY_TIMEOUT's bound: one day; also bounds how long the broker waits before
# redelivery (see postdeploy.store.celery_app).
MAX_TIMEOUT = 86_400
DEFAULT_STATE_DIR = ".postdeploy"  # checkouts, embedded Redis data, its address
DEFAULT_CHECK_INTERVAL = 30.0  # seconds between commit checks (the guide's "every 30s")
DEFAULT_KILL_GRACE = 10.0  # seconds between SIGTERM and SIGKILL of a timed-out job
DEFAULT_OUTPUT_LIMIT = 1024 * 1024  # bytes of output tail kept per run
DEFAULT_HISTORY_LIMIT = 50  # runs kept per app
DEFAULT_CONCURRENCY = 2  # prefork processes per worker
DEFAULT_NOTIFY_BACKOFF = 10.0  # seconds before a failed notification's first retry (doubles)
CONFIG_FILE = "postdeploy.yaml"
# Flower can start jobs and the metrics name apps and commits: loopback unless asked.
DEFAULT_LISTEN_ADDRESS = "127.0.0.1"
DEFAULT_FLOWER_PORT = 5555  # Flower's usual port
DEFAULT_METRICS_PORT = 9808  # postdeploy's /metrics; beside Flower's, not on it

MIN_CHECK_INTERVAL = 1.0  # below this beat floods Redis (0.001 s: ~600 messages/s)
MAX_CHECK_INTERVAL = 7 * 86_400.0  # a commit is only noticed by a check: at least weekly
MAX_KILL_GRACE = 3_600.0  # the grace is added to every run lock and hard time limit
MAX_OUTPUT_LIMIT = 512 * 1024 * 1024  # the tail is one Redis string, at most 512 MiB
MAX_HISTORY_LIMIT = 100_000  # runs kept per app; each is a Redis key
MAX_CONCURRENCY = 256  # prefork processes per worker; more is a typo, not a machine
# Where each setting came from when given as a flag, for the error line.
_FLAGS = {"check_interval": "--interval", "redis_url": "--redis-url",
          "state_dir": "--state-dir"}

BOOT_ID_FILE = Path("/proc/sys/kernel/random/boot_id")  # changes at every boot (Linux)
_HOST_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$")  # also a queue name
_TRANSPORT = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*::")  # git's "<transport>::<address>"
_ALLOWED_SCHEMES = ("https://", "http://", "ssh://", "git://", "file://")


@dataclass(frozen=True)
class AppConfig:
    """One watched application: a ``repo`` we clone, or a ``path`` someone else syncs."""

    name: str
    repo: str | None = None
    path: str | None = None
    branch: str | None = None
    notify: tuple[str, ...] = ()  # Apprise URLs for this app's runs (besides the global ones)
    user: str | None = None  # who its job runs as (a name or uid:gid; see postdeploy.run.user)
    commit_status: CommitStatusConfig | None = None  # where its runs are reported, if anywhere

    @property
    def source(self) -> str:
        """Where the app comes from, safe to print (credentials hidden)."""
        return redact_url(self.repo) if self.repo else str(self.path)

    def describe(self) -> dict[str, str | None]:
        return {"name": self.name, "kind": "repo" if self.repo else "path",
                "source": self.source, "branch": self.branch}


@dataclass(frozen=True)
class Settings:
    """Everything the executor needs; built once by :meth:`load`."""

    redis_url: str | None = None
    state_dir: Path = Path(DEFAULT_STATE_DIR)
    check_interval: float = DEFAULT_CHECK_INTERVAL
    apps: tuple[AppConfig, ...] = ()
    kill_grace: float = DEFAULT_KILL_GRACE
    output_limit: int = DEFAULT_OUTPUT_LIMIT
    history_limit: int = DEFAULT_HISTORY_LIMIT
    concurrency: int = DEFAULT_CONCURRENCY
    log_level: str = "INFO"
    config_file: Path | None = None
    # This worker's host identity (its own queue, its instances) and the boot it runs in.
    host: str = "localhost"
    boot_id: str = ""
    # Notifications: Apprise URLs for every app's runs, and which run endings to send.
    notify: tuple[str, ...] = ()
    notify_on: frozenset[str] = DEFAULT_NOTIFY_ON
    notify_backoff: float = DEFAULT_NOTIFY_BACKOFF
    # Signs push webhooks (POSTDEPLOY_WEBHOOK_SECRET); never shown, hence no repr.
    webhook_secret: str | None = field(default=None, repr=False)
    # One user for every app that has none of its own (POSTDEPLOY_JOB_USER: a name or
    # uid:gid; checked by the worker at start-up), and the uids apps of their own get
    # otherwise (POSTDEPLOY_JOB_UIDS, LOW-HIGH); see postdeploy.run.user.
    job_user: str | None = None
    job_uids: str | None = None
    # The executor's own environment: the base of every job's environment and the
    # fallback for POST_DEPLOY_* keys an appspec leaves out.
    environ: Mapping[str, str] = field(default_factory=dict)

    @property
    def lock_ttl(self) -> int:
        """Seconds a run lock outlives a dead holder: about one check interval."""
        return int(min(30, max(5, self.check_interval)))

    def app(self, name: str) -> AppConfig | None:
        return next((a for a in self.apps if a.name == name), None)

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None,
             overrides: Mapping[str, Any] | None = None) -> Settings:
        """Settings from ``environ`` (default os.environ), postdeploy.yaml, then flags.

        ``overrides`` holds command-line values (None means "not given").
        Raises ConfigError with one exact line for the first wrong value.
        """
        env = dict(os.environ if environ is None else environ)
        flags = {k: v for k, v in (overrides or {}).items() if v is not None}
        if "redis_url" in flags:
            refuse_password_flag(str(flags["redis_url"]))
        if "redis_url_file" in flags:
            flags["redis_url"] = read_redis_url_file(str(flags.pop("redis_url_file")))

        config_path = _config_path(flags.get("config") or env.get("POSTDEPLOY_CONFIG"))
        file_values = _read_config_file(config_path) if config_path else {}

        def pick(key: str, var: str) -> Any:
            if key in flags:
                return flags[key]
            if env.get(var, "") != "":
                return env[var]
            return file_values.get(key)

        def source(key: str, var: str) -> str:
            """How the error line names the setting: the flag, variable or file key."""
            if key in flags:
                return f"{var} ({_FLAGS.get(key, key)})"
            if env.get(var, "") != "" or key not in file_values:
                return var
            return f"{config_path}: {key}"

        def number(key: str, var: str, default: float, low: float, high: float,
                   integer: bool = False) -> float:
            return number_in_range(pick(key, var), source(key, var), default, low, high, integer)

        redis_url = pick("redis_url", "POSTDEPLOY_REDIS_URL")
        state_dir = pick("state_dir", "POSTDEPLOY_STATE_DIR") or DEFAULT_STATE_DIR
        settings = cls(
            redis_url=(check_redis_url(str(redis_url), source("redis_url", "POSTDEPLOY_REDIS_URL"))
                       if redis_url else None),
            state_dir=state_dir_path(state_dir, source("state_dir", "POSTDEPLOY_STATE_DIR")),
            check_interval=number("check_interval", "POSTDEPLOY_CHECK_INTERVAL",
                                  DEFAULT_CHECK_INTERVAL, MIN_CHECK_INTERVAL,
                                  MAX_CHECK_INTERVAL),
            kill_grace=number("kill_grace", "POSTDEPLOY_KILL_GRACE", DEFAULT_KILL_GRACE,
                              0, MAX_KILL_GRACE),
            output_limit=int(number("output_limit", "POSTDEPLOY_OUTPUT_LIMIT",
                                    DEFAULT_OUTPUT_LIMIT, 1, MAX_OUTPUT_LIMIT, integer=True)),
            history_limit=int(number("history_limit", "POSTDEPLOY_HISTORY_LIMIT",
                                     DEFAULT_HISTORY_LIMIT, 1, MAX_HISTORY_LIMIT, integer=True)),
            concurrency=int(number("concurrency", "POSTDEPLOY_CONCURRENCY", DEFAULT_CONCURRENCY,
                                   1, MAX_CONCURRENCY, integer=True)),
            log_level=_log_level(pick("log_level", "POSTDEPLOY_LOG_LEVEL") or "INFO"),
            config_file=config_path,
            host=_host(env.get("POSTDEPLOY_HOST")),
            boot_id=env.get("POSTDEPLOY_BOOT_ID") or _boot_id(),
            notify=parse_urls(pick("notify", "POSTDEPLOY_NOTIFY"),
                              _where("POSTDEPLOY_NOTIFY", "notify", env, config_path)),
            notify_on=parse_events(pick("notify_on", "POSTDEPLOY_NOTIFY_ON"),
                                   _where("POSTDEPLOY_NOTIFY_ON", "notify_on", env, config_path)),
            notify_backoff=_positive_number(
                pick("notify_backoff", "POSTDEPLOY_NOTIFY_BACKOFF"),
                "POSTDEPLOY_NOTIFY_BACKOFF", DEFAULT_NOTIFY_BACKOFF),
            webhook_secret=env.get("POSTDEPLOY_WEBHOOK_SECRET") or None,
            job_user=env.get("POSTDEPLOY_JOB_USER", "").strip() or None,
            job_uids=_uid_range(env.get("POSTDEPLOY_JOB_UIDS")),
            environ=env,
        )
        repo = flags.get("repo") or env.get("POSTDEPLOY_REPO")
        if repo:
            branch = flags.get("branch") or env.get("POSTDEPLOY_BRANCH") or None
            name = flags.get("name") or env.get("POSTDEPLOY_APP") or None
            return replace(settings, apps=(_single_app(repo, branch, name),))
        apps = _apps_from_file(file_values.get("apps"), config_path) if config_path else ()
        return replace(settings, apps=apps)


def default_app_name(source: str) -> str:
    """The repo's directory or URL basename without ``.git``."""
    base = source.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]
    return base[:-4] if base.endswith(".git") else base


def check_repo_url(value: str, where: str) -> str:
    """Refuse repo values git would treat as options or as a command transport."""
    if value.startswith("-"):
        raise ConfigError(f"{where}: repo {value!r} looks like a command-line option; "
                          "give a URL or a path")
    if _TRANSPORT.match(value) or value.lower().startswith("ext:"):
        raise ConfigError(f"{where}: repo {redact_url(value)!r} uses a '<transport>::' "
                          "address, which could run commands; use https://, ssh:// or a path")
    if "://" in value and not value.lower().startswith(_ALLOWED_SCHEMES):
        raise ConfigError(f"{where}: repo {redact_url(value)!r} has an unsupported scheme; "
                          "use https://, http://, ssh://, git://, file:// or a path")
    return value


def _single_app(repo: str, branch: str | None, name: str | None) -> AppConfig:
    check_repo_url(repo, "POSTDEPLOY_REPO")
    app_name = name or default_app_name(repo)
    check_app_name(app_name, "POSTDEPLOY_APP")
    if branch:
        check_branch(branch, "POSTDEPLOY_BRANCH")
    if _looks_local(repo):
        repo = str(Path(repo).expanduser().absolute())
    return AppConfig(name=app_name, repo=repo, branch=branch)


def _looks_local(value: str) -> bool:
    return "://" not in value and not re.match(r"^[^/]+@[^/]+:", value)


def _config_path(explicit: str | None) -> Path | None:
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} not found; "
                              "check --config / POSTDEPLOY_CONFIG")
        return path.absolute()
    default = Path(CONFIG_FILE)
    return default.absolute() if default.is_file() else None


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{where}; fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping with 'apps:'")
    known = {"apps", "check_interval", "redis_url", "state_dir", "kill_grace",
             "output_limit", "history_limit", "concurrency", "log_level",
             "notify", "notify_on", "notify_backoff"}
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r}; "
                          f"known keys: {', '.join(sorted(known))}")
    return data


APP_FIELDS = ("name", "repo", "path", "branch", "notify", "user", "commit_status")


def _apps_from_file(raw: Any, path: Path | None) -> tuple[AppConfig, ...]:
    where = str(path)
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError(f"{where}: 'apps' must be a list of apps")
    apps: list[AppConfig] = []
    for index, item in enumerate(raw):
        label = f"{where}: apps[{index}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{label} must be a mapping with 'repo' or 'path'")
        if isinstance(item.get("name"), str):  # name the app as soon as we can
            label = f"{where}: app {item['name']!r}"
        unknown = sorted(str(k) for k in item
                         if k not in APP_FIELDS)
        if unknown:
            raise ConfigError(f"{label}: unknown field {unknown[0]!r}; "
                              f"use {', '.join(APP_FIELDS)}")
        for key in ("name", "repo", "path", "branch"):
            if key in item and not isinstance(item[key], str):
                raise ConfigError(f"{label}: {key!r} must be a string")
        repo, app_path = item.get("repo"), item.get("path")
        if bool(repo) == bool(app_path):
            raise ConfigError(f"{label}: give exactly one of 'repo' or 'path'")
        name = item.get("name") or default_app_name(str(repo or app_path))
        label = f"{where}: app {name!r}"
        check_app_name(name, f"{label}: name")
        if repo:
            check_repo_url(repo, label)
            if _looks_local(repo):
                repo = str((path.parent if path else Path()) / Path(repo).expanduser())
        if app_path:
            if "branch" in item:
                raise ConfigError(f"{label}: 'branch' only applies to 'repo' apps")
            app_path = str(((path.parent if path else Path()) / app_path).absolute())
        if any(a.name.lower() == name.lower() for a in apps):
            # Case too: on a case-insensitive disk two such checkouts would be one.
            raise ConfigError(f"{label}: name is used twice (names are compared ignoring "
                              "case); give each app its own 'name'")
        if item.get("branch"):
            check_branch(item["branch"], f"{label}: branch")
        user = item.get("user")
        if user is not None:
            if not isinstance(user, str):
                # YAML reads an unquoted 1001:1001 as a base-60 number.
                raise ConfigError(f"{label}: user: {user!r} is not a user name or a quoted "
                                  "uid:gid; write user: \"1001:1001\" (quoted)")
            # Looked up now: a user missing on this host stops start-up, not each run.
            parse_user(user, f"{label}: user")
        apps.append(AppConfig(name=name, repo=repo, path=app_path, branch=item.get("branch"),
                              notify=parse_urls(item.get("notify"), f"{label}: invalid 'notify'"),
                              user=user.strip() if user is not None else None,
                              commit_status=parse_commit_status(item.get("commit_status"),
                                                                label, repo)))
    return tuple(apps)


def _where(var: str, key: str, env: Mapping[str, str], config_path: Path | None) -> str:
    """Where a notify setting came from, to start its error message."""
    if env.get(var, "") != "" or config_path is None:
        return f"invalid {var}"
    return f"{config_path}: invalid '{key}'"


def _positive_number(value: Any, name: str, default: float, integer: bool = False) -> float:
    """A number above 0 with no upper bound (kept for settings that need no range)."""
    return number_in_range(value, name, default, 0, math.inf, integer)


def _host(value: str | None) -> str:
    name = (value or "").strip() or socket.gethostname()
    if not _HOST_NAME.match(name):
        raise ConfigError(f"invalid POSTDEPLOY_HOST: {name[:60]!r}; use letters, digits, "
                          "'.', '_' and '-' (it names the host's queue)")
    return name


def _uid_range(value: str | None) -> str | None:
    if value is None or not value.strip():
        return None
    parse_uid_range(value)  # ConfigError now, not at the first run
    return value.strip()


def _boot_id() -> str:
    """The kernel's boot id: daemons a job started do not outlive a change of it."""
    try:
        return BOOT_ID_FILE.read_text().strip()
    except OSError:
        return ""


def _log_level(value: Any) -> str:
    level = str(value).upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ConfigError(f"invalid POSTDEPLOY_LOG_LEVEL: {value!r}; "
                          "use DEBUG, INFO, WARNING or ERROR")
    return level
