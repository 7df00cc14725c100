"""Commit status settings: an app's ``commit_status:`` in postdeploy.yaml, checked at load.

Sending is :mod:`postdeploy.announce.commit_status`'s.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from postdeploy.errors import ConfigError

PROVIDERS = ("github", "gitlab", "gitea")
DEFAULT_TOKEN_ENV = "POSTDEPLOY_STATUS_TOKEN"
_FIELDS = ("provider", "repository", "api_url", "token_env")
_TOKEN_ENV = re.compile(r"^POSTDEPLOY_[A-Z0-9_]+$")
_LOOPBACK = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class CommitStatusConfig:
    """Where an app's statuses go; the token itself is read only when sending."""

    provider: str
    repository: str  # owner/name (GitLab: the project's path or numeric id)
    api_url: str
    token_env: str = DEFAULT_TOKEN_ENV


def parse_config(raw: Any, label: str, repo: str | None) -> CommitStatusConfig | None:
    """An app's ``commit_status:``: a provider name, or a mapping of provider,
    repository, api_url and token_env. Repository and API default from a remote
    ``repo`` URL. Raises ConfigError starting with ``label``."""
    if raw is None:
        return None
    where = f"{label}: commit_status"
    if isinstance(raw, str):
        raw = {"provider": raw}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: give a provider ({', '.join(PROVIDERS)}) or a mapping "
                          f"of {', '.join(_FIELDS)}")
    unknown = sorted(str(k) for k in raw if k not in _FIELDS)
    if unknown:
        raise ConfigError(f"{where}: unknown field {unknown[0]!r}; use {', '.join(_FIELDS)}")
    for key, value in raw.items():
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{where}: {key!r} must be a non-empty string")
    provider = raw.get("provider")
    if provider not in PROVIDERS:
        raise ConfigError(f"{where}: provider must be one of {', '.join(PROVIDERS)}, "
                          f"not {provider!r}")
    host, path = _remote_parts(repo)
    repository = raw.get("repository") or path
    if not repository:
        raise ConfigError(f"{where}: give 'repository' (owner/name), as the app's source "
                          "is not a remote URL it could be read from")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)+|[0-9]+", repository) or any(
            part in (".", "..") for part in repository.split("/")):
        raise ConfigError(f"{where}: repository {repository!r} is not owner/name")
    api_url = (raw.get("api_url") or _default_api(provider, host) or "").rstrip("/")
    if not api_url:
        raise ConfigError(f"{where}: give 'api_url' (the {provider} API's base URL), as "
                          "the app's source is not a remote URL it could be read from")
    parts = urlsplit(api_url)
    if parts.scheme not in ("https", "http") or not parts.hostname or parts.username:
        raise ConfigError(f"{where}: api_url {api_url!r} must be an https:// URL without "
                          "credentials (the token goes in token_env)")
    if parts.scheme == "http" and parts.hostname not in _LOOPBACK:
        raise ConfigError(f"{where}: api_url {api_url!r} would send the token unencrypted; "
                          "use https://")
    token_env = raw.get("token_env", DEFAULT_TOKEN_ENV)
    if not _TOKEN_ENV.fullmatch(token_env):
        raise ConfigError(f"{where}: token_env {token_env!r} must name a POSTDEPLOY_* "
                          "variable (jobs never see those)")
    return CommitStatusConfig(provider, repository, api_url, token_env)


def _remote_parts(repo: str | None) -> tuple[str | None, str | None]:
    """(host, owner/name) of a remote git URL, https, ssh or scp-like; else (None, None)."""
    if not repo:
        return None, None
    scp = re.fullmatch(r"[^@/\s]+@([^:/\s]+):(.+)", repo)
    if scp:
        host, path = scp.group(1), scp.group(2)
    else:
        parts = urlsplit(repo)
        if parts.scheme not in ("https", "http", "ssh") or not parts.hostname:
            return None, None
        host, path = parts.hostname, parts.path
    path = path.strip("/").removesuffix(".git")
    return host.lower(), (path if "/" in path else None)


def _default_api(provider: str, host: str | None) -> str | None:
    if host is None:
        return None
    if provider == "github":
        return "https://api.github.com" if host == "github.com" else f"https://{host}/api/v3"
    return f"https://{host}/api/v4" if provider == "gitlab" else f"https://{host}/api/v1"
