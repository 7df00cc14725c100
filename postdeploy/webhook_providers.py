"""What each git host sends: its signature header, event and delivery headers, payload fields.

Field names follow each host's documentation of its push event: GitHub's and
Gitea's ``repository`` (``clone_url``, ``ssh_url``, ``git_url``, ``html_url``,
``default_branch``), GitLab's ``project`` and ``repository`` (``git_http_url``,
``git_ssh_url``, ``web_url``, ``homepage``, ``default_branch``).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from postdeploy.webhook_match import Push

# Every field of a repository object that holds a URL git or a browser can use.
URL_FIELDS = ("clone_url", "ssh_url", "git_url", "html_url", "svn_url", "url", "mirror_url",
              "git_http_url", "git_ssh_url", "http_url", "web_url", "homepage")
_DELIVERY_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class HookRejected(Exception):
    """A request the service answers with an error status and one line saying why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Event:
    """A verified request, classified: ``push`` (with what), ``ping`` or ``ignored``."""

    kind: str
    name: str  # the event as the host named it, for logs
    push: Push | None = None


Headers = Mapping[str, str]


@dataclass(frozen=True)
class Provider:
    name: str
    signature_header: str
    verify: Callable[[bytes, str, str], bool]  # (body, header value, secret) -> good?
    classify: Callable[[Headers, dict[str, Any]], Event]
    delivery_headers: tuple[str, ...] = ()

    def delivery_id(self, headers: Headers) -> str | None:
        """The host's id of this delivery (the same on a redelivery), safe as a key part."""
        for name in self.delivery_headers:
            value = headers.get(name, "").strip()
            if value:
                if _DELIVERY_ID.match(value):
                    return value
                return hashlib.sha256(value.encode()).hexdigest()
        return None


def hmac_hex(secret: str, body: bytes) -> str:
    return hmac.digest(secret.encode(), body, "sha256").hex()  # one-shot: the fast path


def _prefixed_hmac(body: bytes, given: str, secret: str) -> bool:
    """``sha256=<hex HMAC-SHA256 of the body>`` (GitHub's X-Hub-Signature-256)."""
    expected = "sha256=" + hmac_hex(secret, body)
    return hmac.compare_digest(expected.encode(), given.strip().lower().encode())


def _bare_hmac(body: bytes, given: str, secret: str) -> bool:
    """The hex HMAC-SHA256 of the body alone (Gitea's X-Gitea-Signature)."""
    return hmac.compare_digest(hmac_hex(secret, body).encode(),
                               given.strip().lower().encode())


def _token(body: bytes, given: str, secret: str) -> bool:
    """The secret itself (GitLab's X-Gitlab-Token), compared through digests of equal size
    so that the time taken does not even tell the secret's length."""
    return hmac.compare_digest(hashlib.sha256(given.encode()).digest(),
                               hashlib.sha256(secret.encode()).digest())


def _repository_urls(*objects: Any) -> tuple[str, ...]:
    urls: list[str] = []
    for obj in objects:
        if isinstance(obj, dict):
            urls += [v for k in URL_FIELDS if isinstance(v := obj.get(k), str) and v]
    return tuple(urls)


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _hub_push(payload: dict[str, Any]) -> Push:
    """GitHub's and Gitea's push payload (Gitea copies GitHub's shape)."""
    repository = payload.get("repository")
    default = repository.get("default_branch") if isinstance(repository, dict) else None
    return Push(repo_urls=_repository_urls(repository), ref=_text(payload.get("ref")) or "",
                default_branch=_text(default))


def _github(headers: Headers, payload: dict[str, Any]) -> Event:
    event = headers.get("X-GitHub-Event", "push").strip().lower()
    if event == "ping":
        return Event("ping", event)
    if event != "push":
        return Event("ignored", event)
    return Event("push", event, _hub_push(payload))


def _gitea(headers: Headers, payload: dict[str, Any]) -> Event:
    event = headers.get("X-Gitea-Event", "push").strip().lower()
    if event == "ping":
        return Event("ping", event)
    if event != "push":
        return Event("ignored", event)
    return Event("push", event, _hub_push(payload))


def _gitlab(headers: Headers, payload: dict[str, Any]) -> Event:
    event = headers.get("X-Gitlab-Event", "Push Hook").strip()
    kind = payload.get("object_kind") or payload.get("event_name")
    if event.lower() == "ping":
        return Event("ping", event)
    # "Push Hook" and "Tag Push Hook"; a system hook carries the same payload.
    if kind not in ("push", "tag_push"):
        return Event("ignored", f"{event} ({kind})" if kind else event)
    project, repository = payload.get("project"), payload.get("repository")
    default = project.get("default_branch") if isinstance(project, dict) else None
    push = Push(repo_urls=_repository_urls(project, repository),
                ref=_text(payload.get("ref")) or "", default_branch=_text(default))
    return Event("push", event, push)


GENERIC_SHAPE = ('{"app": NAME} or {"repository": URL, "ref": "refs/heads/BRANCH"}')


def _generic(headers: Headers, payload: dict[str, Any]) -> Event:
    app, repository = payload.get("app"), payload.get("repository")
    if app is not None:
        names = app if isinstance(app, list) else [app]
        if not names or not all(isinstance(n, str) and n for n in names):
            raise HookRejected(400, f"'app' must be an app name; send {GENERIC_SHAPE}")
        return Event("push", "generic", Push(apps=tuple(names)))
    if isinstance(repository, dict):  # a host's payload forwarded as it is
        urls = _repository_urls(repository)
    elif isinstance(repository, str) and repository.strip():
        urls = (repository,)
    else:
        raise HookRejected(400, f"the body names no app or repository; send {GENERIC_SHAPE}")
    ref = payload.get("ref")
    if ref is not None and not (isinstance(ref, str) and ref.startswith("refs/")):
        raise HookRejected(400, f"'ref' must look like refs/heads/BRANCH, not {str(ref)[:80]!r}")
    return Event("push", "generic", Push(repo_urls=urls, ref=ref,
                                         default_branch=_text(payload.get("default_branch"))))


PROVIDERS = {
    "github": Provider("github", "X-Hub-Signature-256", _prefixed_hmac, _github,
                       ("X-GitHub-Delivery",)),
    "gitea": Provider("gitea", "X-Gitea-Signature", _bare_hmac, _gitea,
                      ("X-Gitea-Delivery",)),
    # Idempotency-Key (GitLab 17.4+) stays the same on GitLab's retries.
    "gitlab": Provider("gitlab", "X-Gitlab-Token", _token, _gitlab,
                       ("X-Gitlab-Event-UUID", "Idempotency-Key")),
    "generic": Provider("generic", "X-Signature", _prefixed_hmac, _generic,
                        ("X-Delivery",)),
}
