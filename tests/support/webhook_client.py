"""Sending webhooks as the git hosts do (payload shapes, headers, signatures), and
running and watching a real webhook service.

The payloads follow each host's documentation of its push event (GitHub
"push" and "ping", Gitea "push", GitLab "Push Hook" / "Tag Push Hook",
Bitbucket Cloud "repo:push"), with the fields a real delivery has, not only
those postdeploy reads.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import http.client
import json
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import redis

from postdeploy.store import keys
from postdeploy.store.celery_app import QUEUE
from tests.support.core import Service, wait_for

SHA_BEFORE = "95790bf891e76fee5e1747ab589903a6a1f80f22"
SHA_AFTER = "da1560886d4f094c3e6c9ef40349f7d38b5d27d7"
NO_COMMIT = "0" * 40  # the "after" of a push that deleted its branch


def hub_signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _user(login: str) -> dict[str, Any]:
    return {"login": login, "id": 21031067, "node_id": "MDQ6VXNlcjIxMDMxMDY3",
            "avatar_url": "https://avatars.githubusercontent.com/u/21031067?v=4",
            "type": "User", "site_admin": False}


def github_push(full_name: str, ref: str = "refs/heads/main", host: str = "github.com",
                default_branch: str = "main", after: str = SHA_AFTER) -> dict[str, Any]:
    """A GitHub push event payload (X-GitHub-Event: push)."""
    owner, name = full_name.split("/")
    web = f"https://{host}/{full_name}"
    commit = {"id": after, "tree_id": "f9d2a07e9488b91af2641b26b9407fe22a451433",
              "distinct": True, "message": "Update README.md",
              "timestamp": "2026-11-29T03:00:00+00:00", "url": f"{web}/commit/{after}",
              "author": {"name": "Octo Cat", "email": "octo@example.com", "username": owner},
              "committer": {"name": "GitHub", "email": "noreply@github.com",
                            "username": "web-flow"},
              "added": [], "removed": [], "modified": ["README.md"]}
    return {
        "ref": ref, "before": SHA_BEFORE, "after": after,
        "repository": {
            "id": 186853002, "node_id": "MDEwOlJlcG9zaXRvcnkxODY4NTMwMDI=", "name": name,
            "full_name": full_name, "private": False, "owner": _user(owner),
            "html_url": web, "description": None, "fork": False, "url": web,
            "git_url": f"git://{host}/{full_name}.git",
            "ssh_url": f"git@{host}:{full_name}.git",
            "clone_url": f"{web}.git", "svn_url": web, "homepage": None,
            "size": 0, "stargazers_count": 0, "language": None,
            "default_branch": default_branch, "master_branch": default_branch,
            "created_at": 1557933565, "pushed_at": 1732849200,
            "updated_at": "2026-11-29T03:00:00Z"},
        "pusher": {"name": owner, "email": "octo@example.com"},
        "sender": _user(owner), "created": False, "deleted": False, "forced": False,
        "base_ref": None, "compare": f"{web}/compare/{SHA_BEFORE[:12]}...{after[:12]}",
        "commits": [commit], "head_commit": commit,
    }


def github_ping(full_name: str) -> dict[str, Any]:
    """What GitHub sends once when a webhook is created (X-GitHub-Event: ping)."""
    return {"zen": "Keep it logically awesome.", "hook_id": 30,
            "hook": {"type": "Repository", "id": 30, "name": "web", "active": True,
                     "events": ["push"],
                     "config": {"content_type": "json", "insecure_ssl": "0",
                                "url": "https://deploy.example.com/hooks/github"}},
            "repository": github_push(full_name)["repository"],
            "sender": _user(full_name.split("/")[0])}


def gitea_push(full_name: str, ref: str = "refs/heads/main", host: str = "gitea.example.com",
               default_branch: str = "main", ssh_port: int = 2222) -> dict[str, Any]:
    """A Gitea push event payload (X-Gitea-Event: push)."""
    owner, name = full_name.split("/")
    web = f"https://{host}/{full_name}"
    gitea_user = {"id": 1, "login": owner, "full_name": "", "email": "someone@example.com",
                  "avatar_url": f"https://{host}/avatars/1", "username": owner}
    commit = {"id": SHA_AFTER, "message": "Webhooks Yay!\n", "url": f"{web}/commit/{SHA_AFTER}",
              "author": {"name": "Gitea", "email": "someone@example.com", "username": owner},
              "committer": {"name": "Gitea", "email": "someone@example.com",
                            "username": owner},
              "verification": None, "timestamp": "2026-11-29T03:00:00Z",
              "added": [], "removed": [], "modified": ["README.md"]}
    return {
        "ref": ref, "before": SHA_BEFORE, "after": SHA_AFTER,
        "compare_url": f"{web}/compare/{SHA_BEFORE}...{SHA_AFTER}",
        "commits": [commit], "total_commits": 1, "head_commit": commit,
        "repository": {
            "id": 140, "owner": gitea_user, "name": name, "full_name": full_name,
            "description": "", "empty": False, "private": False, "fork": False,
            "template": False, "parent": None, "mirror": False, "size": 64,
            "html_url": web, "ssh_url": f"ssh://git@{host}:{ssh_port}/{full_name}.git",
            "clone_url": f"{web}.git", "original_url": "", "website": "",
            "stars_count": 0, "forks_count": 0, "watchers_count": 1, "open_issues_count": 0,
            "default_branch": default_branch, "archived": False,
            "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-11-29T03:00:00Z"},
        "pusher": gitea_user, "sender": gitea_user,
    }


def gitlab_push(path: str, ref: str = "refs/heads/master", host: str = "gitlab.example.com",
                default_branch: str = "master", tag: bool = False) -> dict[str, Any]:
    """A GitLab push (or tag push) hook payload (X-Gitlab-Event: Push Hook)."""
    web = f"http://{host}/{path}"
    ssh = f"git@{host}:{path}.git"
    name = path.rsplit("/", 1)[-1]
    return {
        "object_kind": "tag_push" if tag else "push",
        "event_name": "tag_push" if tag else "push",
        "before": SHA_BEFORE, "after": SHA_AFTER, "ref": ref, "ref_protected": True,
        "checkout_sha": SHA_AFTER, "message": None, "user_id": 4, "user_name": "John Smith",
        "user_username": "jsmith", "user_email": "john@example.com", "user_avatar": None,
        "project_id": 15,
        "project": {
            "id": 15, "name": name, "description": "", "web_url": web, "avatar_url": None,
            "git_ssh_url": ssh, "git_http_url": f"{web}.git", "namespace": "Mike",
            "visibility_level": 0, "path_with_namespace": path,
            "default_branch": default_branch, "ci_config_path": None, "homepage": web,
            "url": ssh, "ssh_url": ssh, "http_url": f"{web}.git"},
        "commits": [{"id": SHA_AFTER, "message": "fixed readme", "title": "fixed readme",
                     "timestamp": "2026-11-29T03:00:00+00:00", "url": f"{web}/commit/x",
                     "author": {"name": "GitLab dev", "email": "[REDACTED]"},
                     "added": [], "modified": ["README.md"], "removed": []}],
        "total_commits_count": 1, "push_options": {},
        "repository": {"name": name, "url": ssh, "description": "", "homepage": web,
                       "git_http_url": f"{web}.git", "git_ssh_url": ssh,
                       "visibility_level": 0},
    }


def bitbucket_push(full_name: str, branch: str | None = "main",
                   kind: str = "branch") -> dict[str, Any]:
    """A Bitbucket Cloud repo:push payload; ``branch=None``: the push deleted it."""
    web = f"https://bitbucket.org/{full_name}"
    actor = {"type": "user", "display_name": "Emma", "uuid": "{a7f8c1d2-0000-4000-8000-1}",
             "account_id": "557058:c0b72ad0", "nickname": "emma"}
    target = {"type": "commit", "hash": SHA_AFTER, "message": "Fix the build\n",
              "date": "2026-11-29T03:00:00+00:00", "author": {"type": "author",
                                                            "raw": "Emma <emma@example.com>"},
              "links": {"html": {"href": f"{web}/commits/{SHA_AFTER}"}}, "parents": []}
    new = None if branch is None else {
        "type": kind, "name": branch, "target": target,
        "links": {"html": {"href": f"{web}/branch/{branch}"}}}
    old = {"type": kind, "name": branch or "main", "target": {**target, "hash": SHA_BEFORE}}
    return {
        "push": {"changes": [{"new": new, "old": old, "created": False,
                              "closed": branch is None, "forced": False,
                              "truncated": False, "commits": [target]}]},
        "actor": actor,
        "repository": {
            "type": "repository", "full_name": full_name, "name": full_name.split("/")[1],
            "uuid": "{0b8e33c8-0000-4000-8000-2}", "is_private": True, "scm": "git",
            "links": {"self": {"href": f"https://api.bitbucket.org/2.0/repositories/"
                                       f"{full_name}"},
                      "html": {"href": web}, "avatar": {"href": f"{web}/avatar/32/"}},
            "workspace": {"type": "workspace", "slug": full_name.split("/")[0]},
            "project": {"type": "project", "key": "PROJ", "name": "Project"}},
    }


def signed(provider: str, secret: str, payload: Any, event: str = "push",
           delivery: str | None = None, body: bytes | None = None
           ) -> tuple[bytes, dict[str, str]]:
    """The body and headers ``provider`` sends for ``payload``, signed with ``secret``."""
    data = body if body is not None else json.dumps(payload).encode()
    delivery = delivery or str(uuid.uuid4())
    headers = {"Content-Type": "application/json"}
    if provider == "github":
        headers.update({"User-Agent": "GitHub-Hookshot/044aadd", "X-GitHub-Event": event,
                        "X-GitHub-Delivery": delivery, "X-GitHub-Hook-ID": "30",
                        "X-Hub-Signature-256": hub_signature(secret, data)})
    elif provider == "gitea":
        hexdigest = hmac.new(secret.encode(), data, hashlib.sha256).hexdigest()
        headers.update({"User-Agent": "Go-http-client/1.1", "X-Gitea-Event": event,
                        "X-Gitea-Event-Type": event, "X-Gitea-Delivery": delivery,
                        "X-Gitea-Signature": hexdigest, "X-GitHub-Event": event,
                        "X-GitHub-Delivery": delivery, "X-Gogs-Event": event,
                        "X-Gogs-Delivery": delivery})
    elif provider == "gitlab":
        headers.update({"User-Agent": "GitLab/17.6.0", "X-Gitlab-Event": event,
                        "X-Gitlab-Token": secret, "X-Gitlab-Event-UUID": delivery,
                        "X-Gitlab-Webhook-UUID": "13792a34-cac6-4fda-95a8-c58e00a3954e",
                        "X-Gitlab-Instance": "https://gitlab.example.com"})
    elif provider == "bitbucket":
        headers.update({"User-Agent": "Bitbucket-Webhooks/2.0", "X-Event-Key": event,
                        "X-Request-UUID": delivery,
                        "X-Hook-UUID": "c4a84d68-42e3-4f2a-9d5e-6c8f2b7e9a11",
                        "X-Attempt-Number": "1",
                        "X-Hub-Signature": hub_signature(secret, data)})
    else:
        headers.update({"X-Signature": hub_signature(secret, data), "X-Delivery": delivery})
    return data, headers


@dataclass
class Reply:
    status: int
    body: dict[str, Any]


def post(port: int, path: str, body: bytes, headers: dict[str, str],
         timeout: float = 10) -> Reply:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", path, body=body, headers=headers)
        response = connection.getresponse()
        data = response.read()
    finally:
        connection.close()
    return Reply(response.status, json.loads(data) if data else {})


def raw_request(path: str, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close",
             f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _send_all(port: int, requests: list[bytes]) -> list[tuple[int, float]]:
    """Open every connection first, then send every request at once."""
    streams = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", port)
                                     for _ in requests))
    go = asyncio.Event()

    async def one(index: int) -> tuple[int, float]:
        reader, writer = streams[index]
        await go.wait()
        started = time.perf_counter()
        writer.write(requests[index])
        await writer.drain()
        response = await reader.read()  # Connection: close: the answer ends at EOF
        took = time.perf_counter() - started
        writer.close()
        status = int(response.split(b" ", 2)[1]) if response else 0
        return status, took

    tasks = [asyncio.create_task(one(i)) for i in range(len(requests))]
    await asyncio.sleep(0)
    go.set()
    return list(await asyncio.gather(*tasks))


def post_concurrently(port: int, requests: list[bytes]) -> list[tuple[int, float]]:
    """(status, seconds to the full answer) of each raw request, all sent together."""
    return asyncio.run(_send_all(port, requests))


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def start_hook(env: dict[str, str], log: Path, port: int, processes: int = 1) -> Service:
    service = Service(["-m", "postdeploy.cli", "webhook", "--port", str(port),
                       "--processes", str(processes)], env, log)
    wait_for(lambda: (healthy(port) and len(server_pids(service)) == processes)
             or not service.alive(), 30, what="the webhook service")
    assert service.alive(), service.log()
    return service


def server_pids(service: Service) -> list[int]:
    """The processes that answer: the service itself, or the ones it forked."""
    try:
        children = psutil.Process(service.proc.pid).children()
    except psutil.Error:
        return []
    return [child.pid for child in children] or [service.proc.pid]


def queued_checks(client: redis.Redis) -> list[str]:
    """Apps of the postdeploy.check_app messages waiting in the broker's queue."""
    names = []
    for raw in client.lrange(keys.CELERY_PREFIX + QUEUE, 0, -1):
        message = json.loads(raw)
        assert message["headers"]["task"] == "postdeploy.check_app"
        args = json.loads(base64.b64decode(message["body"]))[0]
        names.append(args[0])
    return sorted(names)


def cli_run(args: list[str], env: dict[str, str]) -> Any:
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                          timeout=60)
