"""Which apps a push is for: repository URLs compared after normalisation, then branches.

A git host names one repository in many ways (https, ssh, scp-like ``git@host:path``,
with or without ``.git``, credentials, a trailing slash, a web page URL), and the
operator wrote yet another in postdeploy.yaml. Each is reduced to a key that
ignores those differences, so any of the payload's URLs finds the app.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from postdeploy.config.settings import AppConfig

BRANCH_PREFIX = "refs/heads/"
# git's scp-like syntax: [user@]host:path, with no slash before the colon.
_SCP = re.compile(r"^(?:[^@/]+@)?(?P<host>[^/:]+):(?P<path>.*)$")
# No repository URL or path holds control characters (a NUL cannot even be a path) or
# lone surrogates (JSON can carry them; no file name can be encoded with one).
_UNUSABLE = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")

# (host, path) of a remote repository; ("", real path) of one on this machine.
RepoKey = tuple[str, str]


def repo_key(url: str) -> RepoKey | None:
    """The comparable form of a repository URL or path; None for an empty or odd value.

    Scheme, credentials, port, ``.git`` suffix, trailing slashes and case are
    dropped: hosts compare without case by definition, and the big git hosts
    treat owner/repository paths without case too, so a push for
    ``Acme/Shop`` finds an app configured as ``acme/shop``. An app matched too
    eagerly only gets one extra, idempotent commit check.
    """
    text = url.strip()
    if not text or _UNUSABLE.search(text):
        return None
    if text.lower().startswith("file://"):
        return _local(urlsplit(text).path)
    if "://" not in text and not _SCP.match(text):
        return _local(text)  # not cached: what a path leads to may change
    return _remote_key(text)


@functools.lru_cache(maxsize=4096)
def _remote_key(text: str) -> RepoKey | None:
    """A remote URL's key; cached, since every delivery of a repository repeats its URLs."""
    if "://" in text:
        try:
            parts = urlsplit(text)
            host = (parts.hostname or "").lower()  # without user-info and port
        except ValueError:  # e.g. a malformed IPv6 host
            return None
        path = parts.path
    elif scp := _SCP.match(text):
        host, path = scp.group("host").lower(), scp.group("path")
    else:
        return None
    path = path.strip("/")
    if path.endswith(".git"):
        path = path[:-4].rstrip("/")
    if not host or not path:
        return None
    return host, path.lower()


def _local(path: str) -> RepoKey | None:
    if not path:
        return None
    return "", os.path.realpath(os.path.expanduser(path))


def branch_of(ref: str | None) -> str | None:
    """``refs/heads/main`` -> ``main``; None for tags and other refs."""
    if ref and ref.startswith(BRANCH_PREFIX):
        return ref[len(BRANCH_PREFIX):]
    return None


@dataclass(frozen=True)
class Push:
    """What a webhook says was pushed, whichever host sent it."""

    repo_urls: tuple[str, ...] = ()
    ref: str | None = None  # None: the sender did not say (only the generic hook)
    default_branch: str | None = None  # the repository's HEAD branch, when the payload says
    apps: tuple[str, ...] = ()  # apps named by the sender (generic {"app": NAME})
    deleted: bool = False  # the push removed its ref: no commit to deploy
    refs: tuple[str, ...] = ()  # every ref a push changed, when several (Bitbucket)

    @property
    def all_refs(self) -> tuple[str | None, ...]:
        return self.refs or (self.ref,)

    @property
    def is_branch(self) -> bool:
        return any(ref is None or branch_of(ref) is not None for ref in self.all_refs)


class AppIndex:
    """The configured apps by repository key, built once at start-up."""

    def __init__(self, apps: Sequence[AppConfig]) -> None:
        self.apps = {app.name: app for app in apps}
        self._by_key: dict[RepoKey, list[AppConfig]] = {}
        for app in apps:
            key = repo_key(app.repo or app.path or "")
            if key is not None:
                self._by_key.setdefault(key, []).append(app)

    def unknown(self, names: Iterable[str]) -> list[str]:
        return [name for name in names if name not in self.apps]

    def matching(self, push: Push) -> list[str]:
        """Names of the apps whose repository and branch the push is for."""
        if push.deleted or not push.is_branch:
            # A deleted branch has no commit to run; tags and other refs never
            # change what a branch deploys.
            return []
        keys = {key for url in push.repo_urls if (key := repo_key(url)) is not None}
        found: list[str] = []
        for key in keys:
            for app in self._by_key.get(key, []):
                if app.name not in found and _branch_matches(app, push):
                    found.append(app.name)
        return sorted(found)


def _branch_matches(app: AppConfig, push: Push) -> bool:
    return any(_ref_matches(app, ref, push.default_branch) for ref in push.all_refs)


def _ref_matches(app: AppConfig, ref: str | None, default_branch: str | None) -> bool:
    if ref is not None and branch_of(ref) is None:
        return False  # a tag among a push's branches
    branch = branch_of(ref)
    if branch is None or app.path:
        # The sender gave no ref, or the app is a working copy whose branch is
        # whatever someone checked out: the check itself reads what is deployed.
        return True
    if app.branch:
        return branch == app.branch
    # The app follows the remote HEAD: the repository's default branch, when known.
    return default_branch is None or branch == default_branch
