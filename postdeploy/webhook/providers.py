"""What each git host sends: its signature header, event and delivery headers, payload fields.

Field names follow each host's documentation of its push event: GitHub's and
Gitea's ``repository`` (``clone_url``, ``ssh_url``, ``git_url``, ``html_url``,
``default_branch``), GitLab's ``project`` and ``repository`` (``git_http_url``,
``git_ssh_url``, ``web_url``, ``homepage``, ``default_branch``), Bitbucket
Cloud's ``repository`` (``full_name``, ``links.html.href``) and
``push.changes[].new`` (``type``, ``name``; null when the branch was deleted).
Every field is read as untrusted: a value of the wrong type is as if absent.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from postdeploy.webhook.match import BRANCH_PREFIX, Push

# Every field of a repository object that holds a URL git or a browser can use.
URL_FIELDS = ("clone_url", "ssh_url", "git_url", "html_url", "svn_url", "url", "mirror_url",
              "git_http_url", "git_ssh_url", "http_url", "web_url", "homepage")
_DELIVERY_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
NO_COMMIT = "0" * 40  # the "after" of a push that deleted its ref
BITBUCKET = "bitbucket.org"


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
    # Why a request was refused (401): a signature the body does not match, or a token
    # that is not the secret; both name POSTDEPLOY_WEBHOOK_SECRET.
    mismatch: str = ("{header} does not match the body; the secret differs from "
                     "POSTDEPLOY_WEBHOOK_SECRET (or the body was changed on the way)")

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


def _field(obj: Any, *path: str) -> Any:
    """``obj[path[0]][path[1]]...``, or None where a level is missing or not an object."""
    for name in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(name)
    return obj


def _deleted(payload: dict[str, Any]) -> bool:
    """The push removed its ref (GitHub's and Gitea's ``deleted``, an all-zero ``after``)."""
    return payload.get("deleted") is True or payload.get("after") == NO_COMMIT


def _hub_push(payload: dict[str, Any]) -> Push:
    """GitHub's and Gitea's push payload (Gitea copies GitHub's shape)."""
    repository = payload.get("repository")
    return Push(repo_urls=_repository_urls(repository), ref=_text(payload.get("ref")) or "",
                default_branch=_text(_field(repository, "default_branch")),
                deleted=_deleted(payload))


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
    # A deleted branch: "after" all zeros and no commit to check out.
    deleted = _deleted(payload) or ("checkout_sha" in payload
                                    and payload["checkout_sha"] is None)
    push = Push(repo_urls=_repository_urls(project, repository),
                ref=_text(payload.get("ref")) or "",
                default_branch=_text(_field(project, "default_branch")), deleted=deleted)
    return Event("push", event, push)


def _bitbucket(headers: Headers, payload: dict[str, Any]) -> Event:
    """Bitbucket Cloud's repo:push: one push may change several branches."""
    event = headers.get("X-Event-Key", "").strip().lower()
    if event.startswith("diagnostics:") or event == "ping":
        return Event("ping", event)
    if event != "repo:push":
        return Event("ignored", event)
    repository = payload.get("repository")
    urls = [u for u in (_text(_field(repository, "links", "html", "href")),) if u]
    if (full_name := _text(_field(repository, "full_name"))) is not None:
        urls += [f"https://{BITBUCKET}/{full_name}", f"git@{BITBUCKET}:{full_name}.git"]
    changes = _field(payload, "push", "changes")
    branches = []
    for change in changes if isinstance(changes, list) else []:
        new = _field(change, "new")  # null: the branch (or tag) was deleted
        if _field(new, "type") == "branch" and (name := _text(_field(new, "name"))):
            branches.append(BRANCH_PREFIX + name)
    if not branches:  # deletions, tags only, or nothing readable
        return Event("push", event, Push(repo_urls=tuple(urls), ref="", deleted=True))
    return Event("push", event, Push(repo_urls=tuple(urls), ref=branches[0],
                                     refs=tuple(branches)))


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
                                         default_branch=_text(payload.get("default_branch")),
                                         deleted=_deleted(payload)))


PROVIDERS = {
    "github": Provider("github", "X-Hub-Signature-256", _prefixed_hmac, _github,
                       ("X-GitHub-Delivery",)),
    "gitea": Provider("gitea", "X-Gitea-Signature", _bare_hmac, _gitea,
                      ("X-Gitea-Delivery",)),
    # Idempotency-Key (GitLab 17.4+) stays the same on GitLab's retries.
    "gitlab": Provider("gitlab", "X-Gitlab-Token", _token, _gitlab,
                       ("X-Gitlab-Event-UUID", "Idempotency-Key"),
                       "X-Gitlab-Token is not the secret; set the webhook's secret token "
                       "to the value of POSTDEPLOY_WEBHOOK_SECRET"),
    "generic": Provider("generic", "X-Signature", _prefixed_hmac, _generic,
                        ("X-Delivery",)),
    # X-Request-UUID stays the same on Bitbucket's retries; X-Hook-UUID names the
    # webhook, the same for every delivery, so it can never tell two pushes apart.
    "bitbucket": Provider("bitbucket", "X-Hub-Signature", _prefixed_hmac, _bitbucket,
                          ("X-Request-UUID",)),
}
