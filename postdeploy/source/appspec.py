"""The job an app asks for: POST_DEPLOY_* entries of appspec.yaml at one commit."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from postdeploy.config.settings import MAX_TIMEOUT
from postdeploy.errors import AppSpecError
from postdeploy.source.readiness import (
    DEFAULT_WAIT_TIMEOUT,
    Gate,
    check_template,
    parse_wait_for_commit,
)

APPSPEC_FILE = "appspec.yaml"
DEFAULT_TIMEOUT = 300  # seconds, the guide's example value
MAX_APPSPEC_BYTES = 1024 * 1024  # a real appspec is a few KB; refuse anything huge
JOB_KEYS = ("POST_DEPLOY_COMMAND", "POST_DEPLOY_FOLDER", "POST_DEPLOY_TIMEOUT")
# Where and when the job runs (docs/hosts.md).
PLACEMENT_KEYS = ("POST_DEPLOY_SCOPE", "POST_DEPLOY_WAIT_URL", "POST_DEPLOY_WAIT_FOR_COMMIT",
                  "POST_DEPLOY_WAIT_TIMEOUT")
SCOPE_APP = "app"  # once per deployment across the fleet
SCOPE_INSTANCE = "instance"  # once per deployment on every host that serves the app
SCOPES = (SCOPE_APP, SCOPE_INSTANCE)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class JobSpec:
    """What to run, where, for how long, with which extra environment."""

    command: str | None = None
    folder: str = ""
    timeout: int = DEFAULT_TIMEOUT
    env: Mapping[str, str] = field(default_factory=dict)
    secrets: frozenset[str] = frozenset()
    warnings: tuple[str, ...] = ()
    scope: str = SCOPE_APP
    gate: Gate | None = None  # the readiness gate, when POST_DEPLOY_WAIT_URL is set


def parse_appspec(text: bytes | None, fallback_env: Mapping[str, str]) -> JobSpec:
    """Parse appspec.yaml content (None: the file does not exist at this commit).

    POST_DEPLOY_* keys missing from the file are taken from ``fallback_env``
    (the executor's environment). Raises AppSpecError for a malformed file.
    """
    entries, secrets = _read_entries(text) if text is not None else ({}, set())
    job_values = {k: entries.pop(k) for k in (*JOB_KEYS, *PLACEMENT_KEYS) if k in entries}
    for key in (*JOB_KEYS, *PLACEMENT_KEYS):
        if key not in job_values and fallback_env.get(key):
            job_values[key] = fallback_env[key]

    warnings: list[str] = []
    command = (job_values.get("POST_DEPLOY_COMMAND") or "").strip() or None
    folder = check_folder_value(job_values.get("POST_DEPLOY_FOLDER", ""))
    timeout = _timeout(job_values.get("POST_DEPLOY_TIMEOUT"), warnings)
    scope, gate = _placement(job_values, warnings)
    return JobSpec(command=command, folder=folder, timeout=timeout, env=entries,
                   secrets=frozenset(secrets), warnings=tuple(warnings), scope=scope,
                   gate=gate)


def _placement(values: Mapping[str, str], warnings: list[str]) -> tuple[str, Gate | None]:
    """POST_DEPLOY_SCOPE and the readiness gate; a value that cannot be meant is an error."""
    scope = (values.get("POST_DEPLOY_SCOPE") or SCOPE_APP).strip().lower()
    if scope not in SCOPES:
        raise AppSpecError(f"invalid POST_DEPLOY_SCOPE: {values['POST_DEPLOY_SCOPE'][:40]!r}; "
                           f"use {SCOPE_APP!r} (once per deployment) or {SCOPE_INSTANCE!r} "
                           "(once per deployment on every host)")
    url = (values.get("POST_DEPLOY_WAIT_URL") or "").strip()
    for_commit = parse_wait_for_commit(values.get("POST_DEPLOY_WAIT_FOR_COMMIT"))
    wait_timeout = _timeout(values.get("POST_DEPLOY_WAIT_TIMEOUT"), warnings,
                            "POST_DEPLOY_WAIT_TIMEOUT", DEFAULT_WAIT_TIMEOUT)
    if not url:
        if for_commit:
            warnings.append("POST_DEPLOY_WAIT_FOR_COMMIT has no effect without "
                            "POST_DEPLOY_WAIT_URL")
        return scope, None
    check_template(url)
    return scope, Gate(url, for_commit, wait_timeout)


def check_folder_value(value: str) -> str:
    """Normalise POST_DEPLOY_FOLDER; refuse absolute paths and any '..' component."""
    text = value.strip()
    if not text or text in {".", "./"}:
        return ""
    if text.startswith("/") or PurePosixPath(text).is_absolute():
        raise AppSpecError(f"POST_DEPLOY_FOLDER {text!r} is absolute; "
                           "give a path relative to the repository root")
    parts = PurePosixPath(text).parts
    if ".." in parts:
        raise AppSpecError(f"POST_DEPLOY_FOLDER {text!r} leaves the repository ('..'); "
                           "give a path inside it")
    return str(PurePosixPath(*[p for p in parts if p != "."]))


def resolve_folder(checkout: Path, folder: str) -> Path:
    """The job's working directory; must exist and stay inside ``checkout`` (symlinks too)."""
    root = checkout.resolve()
    target = (root / folder).resolve() if folder else root
    if target != root and root not in target.parents:
        raise AppSpecError(f"POST_DEPLOY_FOLDER {folder!r} leads out of the repository "
                           "through a symlink; point it at a real folder inside the repo")
    if not target.is_dir():
        raise AppSpecError(f"POST_DEPLOY_FOLDER {folder!r} does not exist at this commit; "
                           "create it or fix the path")
    return target


def _read_entries(text: bytes) -> tuple[dict[str, str], set[str]]:
    if len(text) > MAX_APPSPEC_BYTES:
        raise AppSpecError(f"{APPSPEC_FILE} is {len(text)} bytes; the limit is "
                           f"{MAX_APPSPEC_BYTES} bytes")
    data = _safe_yaml(text)
    if data is None:
        return {}, set()
    if not isinstance(data, dict):
        raise AppSpecError(f"{APPSPEC_FILE}: top level must be a mapping with 'envs:', "
                           f"not a {type(data).__name__}")
    envs = data.get("envs")
    if envs is None:
        return {}, set()
    if not isinstance(envs, list):
        raise AppSpecError(f"{APPSPEC_FILE}: 'envs' must be a list of key/value entries")
    entries: dict[str, str] = {}
    secrets: set[str] = set()
    for index, item in enumerate(envs):
        where = f"{APPSPEC_FILE}: envs[{index}]"
        if not isinstance(item, dict):
            raise AppSpecError(f"{where} must be a mapping with 'key' and 'value'")
        key = item.get("key")
        if not isinstance(key, str) or not _ENV_NAME.match(key):
            raise AppSpecError(f"{where}: key {_shown(key)} is not a valid environment "
                               "variable name (letters, digits, '_')")
        value = _scalar(item.get("value", ""), f"{where} ({key})")
        if item.get("type") == "SECRET":
            secrets.add(value)
        entries[key] = value
    return entries, secrets


# libyaml's safe loader where PyYAML was built with it: the same rules, a tenth of the CPU.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _safe_yaml(text: bytes) -> Any:
    """safe_load, but refuse aliases: they are how 'billion laughs' bombs expand."""
    try:
        for event in yaml.parse(text, Loader=_LOADER):
            if isinstance(event, yaml.AliasEvent):
                raise AppSpecError(f"{APPSPEC_FILE}: YAML aliases (*name) are not "
                                   "supported; write values out")
        return yaml.load(text, Loader=_LOADER)  # noqa: S506 (a safe loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise AppSpecError(f"{APPSPEC_FILE}: invalid YAML{where}: {problem}") from None


def _scalar(value: Any, where: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return str(value)
    if value is None:
        return ""
    raise AppSpecError(f"{where}: value must be a string, not a {type(value).__name__}")


def _shown(key: Any) -> str:
    text = repr(key)
    return text if len(text) <= 40 else text[:37] + "..."


def _timeout(raw: str | None, warnings: list[str], name: str = "POST_DEPLOY_TIMEOUT",
             default: int = DEFAULT_TIMEOUT) -> int:
    if raw is None or raw.strip() == "":
        if raw is not None:
            warnings.append(f"{name} is empty; using the default {default} s")
        return default
    text = raw.strip()
    if not re.fullmatch(r"[0-9]+", text) or int(text) <= 0:
        warnings.append(f"invalid {name}: {text[:40]!r} is not a positive "
                        f"integer; using the default {default} s")
        return default
    if int(text) > MAX_TIMEOUT:
        warnings.append(f"{name} {text[:40]} is above the maximum "
                        f"{MAX_TIMEOUT} s; using {MAX_TIMEOUT} s")
        return MAX_TIMEOUT
    return int(text)
