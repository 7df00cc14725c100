"""The push trigger: a real `postdeploy webhook` process answering real HTTP requests.

Payloads and headers are those GitHub, Gitea and GitLab send (tests/webhook_client.py);
what the service queued is read back from the broker's queue in Redis.
tests/test_webhook_end_to_end.py runs a real worker (and a real `postdeploy up`) behind it.
"""

from __future__ import annotations

import http.client
import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from postdeploy.store import keys
from postdeploy.store.state import StateStore
from tests.conftest import EXTERNAL_REDIS
from tests.support.clirun import cli, cli_env
from tests.support.core import (
    REPO_ROOT,
    GitRemote,
    RedisServer,
    Service,
    free_port,
)
from tests.support.webhook_client import (
    NO_COMMIT,
    bitbucket_push,
    cli_run,
    gitea_push,
    github_ping,
    github_push,
    gitlab_push,
    healthy,
    hub_signature,
    post,
    post_concurrently,
    queued_checks,
    raw_request,
    signed,
    start_hook,
)

SECRET = "d0c5-webhook-secret-4f1e"


@dataclass
class Hook:
    """A running `postdeploy webhook` and what it was configured with."""

    service: Service
    port: int
    env: dict[str, str]
    state_dir: Path
    local_repo: Path

    def send(self, provider: str, payload: Any, event: str = "push",
             delivery: str | None = None, query: str = "", **header_changes: str) -> Any:
        body, headers = signed(provider, SECRET, payload, event, delivery)
        headers.update(header_changes)
        return post(self.port, f"/hooks/{provider}{query}", body, headers)


@pytest.fixture(scope="module")
def hook(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hook]:
    """One service for the protocol tests; each test gets the Redis flushed (rclient)."""
    root = tmp_path_factory.mktemp("webhook")
    bare = GitRemote(root / "git").bare
    (root / "link").symlink_to(bare)  # the app names the repository through a symlink
    (root / "site").mkdir()
    config = root / "postdeploy.yaml"
    config.write_text(yaml.safe_dump({"apps": [
        # Credentials and case differ from what GitHub sends (Acme/Shop).
        {"name": "shop", "repo": "https://deploy:t0ken@github.com/acme/shop.git",
         "branch": "main"},
        # No branch: follows the remote HEAD, GitLab's project.default_branch.
        {"name": "blog", "repo": "git@gitlab.example.com:acme/blog.git"},
        {"name": "wiki", "repo": "https://gitea.example.com/acme/wiki", "branch": "production"},
        {"name": "local", "repo": str(root / "link"), "branch": "main"},
        {"name": "site", "path": str(root / "site")},
        {"name": "bucket", "repo": "git@bitbucket.org:acme/bucket.git", "branch": "main"},
    ]}))
    state_dir = root / "state"
    env = cli_env(POSTDEPLOY_REDIS_URL=EXTERNAL_REDIS or redis_server.url,
                  POSTDEPLOY_CONFIG=str(config), POSTDEPLOY_STATE_DIR=str(state_dir),
                  POSTDEPLOY_WEBHOOK_SECRET=SECRET)
    port = free_port()
    # Two server processes on the port: every test below also holds across processes.
    service = start_hook(env, root / "webhook.log", port, processes=2)
    yield Hook(service, port, env, state_dir, bare)
    service.stop(signal.SIGTERM)
    assert service.proc.returncode == 0, service.log()[-2000:]
    assert "Traceback" not in service.log()


# -- start-up ----------------------------------------------------------------------

@pytest.mark.parametrize("secret", [None, ""])
def test_refuses_to_start_without_a_secret(hook: Hook, secret: str | None) -> None:
    env = {k: v for k, v in hook.env.items() if k != "POSTDEPLOY_WEBHOOK_SECRET"}
    if secret is not None:
        env["POSTDEPLOY_WEBHOOK_SECRET"] = secret
    for command in (["-m", "postdeploy.cli", "webhook"],):
        result = cli_run(command + ["--port", str(free_port())], env)
        assert result.returncode == 2, result
        assert result.stderr.startswith("postdeploy: error: POSTDEPLOY_WEBHOOK_SECRET is not "
                                        "set"), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_without_redis_it_says_where_to_point_it(hook: Hook, tmp_path: Path) -> None:
    env = {k: v for k, v in hook.env.items() if k != "POSTDEPLOY_REDIS_URL"}
    env["POSTDEPLOY_STATE_DIR"] = str(tmp_path / "no-up-here")
    result = cli_run(["-m", "postdeploy.cli", "webhook", "--port", str(free_port())], env)
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("postdeploy: error: no Redis configured")
    assert "POSTDEPLOY_REDIS_URL" in line


@pytest.mark.parametrize("processes", ["1", "2"])
def test_refuses_a_port_in_use(hook: Hook, processes: str) -> None:
    # The running service's processes share the port: another service must not join them.
    result = cli_run(["-m", "postdeploy.cli", "webhook", "--port", str(hook.port),
                      "--processes", processes], hook.env)
    assert result.returncode == 2
    assert result.stderr.startswith(f"postdeploy: error: cannot listen on 127.0.0.1:{hook.port}")
    assert len(result.stderr.strip().splitlines()) == 1
    assert healthy(hook.port)  # the running service is untouched


# -- each provider's push -----------------------------------------------------------

def test_github_push_queues_the_check_and_answers_202(hook: Hook, rclient: redis.Redis) -> None:
    before = time.time()
    reply = hook.send("github", github_push("Acme/Shop"))
    assert (reply.status, reply.body["apps"], reply.body["status"]) == (202, ["shop"], "queued")
    assert queued_checks(rclient) == ["shop"]
    pushed = float(rclient.get(keys.last_push("shop")) or 0)
    assert before <= pushed <= time.time()


@pytest.mark.parametrize("field", ["clone_url", "ssh_url", "git_url", "html_url"])
def test_any_of_the_payloads_urls_finds_the_app(hook: Hook, rclient: redis.Redis,
                                                field: str) -> None:
    payload = github_push("Acme/Shop")
    repository = payload["repository"]
    for other in ("clone_url", "ssh_url", "git_url", "html_url", "svn_url", "url"):
        if other != field:
            repository.pop(other)
    assert hook.send("github", payload).body["apps"] == ["shop"]


def test_gitea_push_with_its_signature(hook: Hook, rclient: redis.Redis) -> None:
    reply = hook.send("gitea", gitea_push("acme/wiki", ref="refs/heads/production"))
    assert (reply.status, reply.body["apps"]) == (202, ["wiki"])
    assert queued_checks(rclient) == ["wiki"]
    assert hook.send("gitea", gitea_push("acme/wiki", ref="refs/heads/main")).body["apps"] == []


def test_gitlab_push_follows_the_default_branch_of_a_branchless_app(
        hook: Hook, rclient: redis.Redis) -> None:
    reply = hook.send("gitlab", gitlab_push("acme/blog"), event="Push Hook")
    assert (reply.status, reply.body["apps"]) == (202, ["blog"])
    other = hook.send("gitlab", gitlab_push("acme/blog", ref="refs/heads/feature"),
                      event="Push Hook")
    assert (other.status, other.body["apps"]) == (202, [])
    # After the default branch changed on the host, that branch is what the app follows.
    moved = hook.send("gitlab", gitlab_push("acme/blog", ref="refs/heads/main",
                                            default_branch="main"), event="Push Hook")
    assert moved.body["apps"] == ["blog"]
    # (One check: the first is still queued, and it will see this push's commit too.)
    assert queued_checks(rclient) == ["blog"]


def test_a_push_while_its_apps_check_waits_queues_no_second_check(
        hook: Hook, rclient: redis.Redis) -> None:
    """A stampede of pushes makes one queued check per app; once that check has
    started (and cleared its mark, before it looks at git), the next push queues
    another, since the started check may not see that push's commit."""
    push = gitea_push("acme/wiki", ref="refs/heads/production")
    for _ in range(5):  # each a delivery of its own
        assert hook.send("gitea", push).body["apps"] == ["wiki"]
    assert queued_checks(rclient) == ["wiki"]
    assert rclient.ttl(keys.check_pending("wiki")) > 0  # a lost check blocks nothing for long
    StateStore(rclient).check_started("wiki")  # what postdeploy.check_app does first
    assert hook.send("gitea", push).body["apps"] == ["wiki"]
    assert queued_checks(rclient) == ["wiki", "wiki"]


def test_generic_hook_by_app_or_by_repository_and_ref(hook: Hook, rclient: redis.Redis) -> None:
    assert hook.send("generic", {"app": "wiki"}).body["apps"] == ["wiki"]
    # A local repository is matched by its real path (the app names it through a symlink).
    by_repo = hook.send("generic", {"repository": str(hook.local_repo) + "/",
                                    "ref": "refs/heads/main"})
    assert (by_repo.status, by_repo.body["apps"]) == (202, ["local"])
    site = hook.send("generic", {"repository": str(hook.local_repo.parent.parent / "site")})
    assert site.body["apps"] == ["site"]
    assert queued_checks(rclient) == ["local", "site", "wiki"]


def test_query_app_names_the_app_whatever_the_payload(hook: Hook, rclient: redis.Redis) -> None:
    reply = hook.send("github", github_push("someone/else"), query="?app=blog&app=shop")
    assert (reply.status, reply.body["apps"]) == (202, ["blog", "shop"])
    unknown = hook.send("github", github_push("Acme/Shop"), query="?app=nope")
    assert unknown.status == 404 and "unknown app 'nope'" in unknown.body["error"]
    assert "blog, bucket, local, shop, site, wiki" in unknown.body["error"]
    bad_app = hook.send("generic", {"app": "nope"})
    assert bad_app.status == 404
    assert queued_checks(rclient) == ["blog", "shop"]


# -- pushes that match nothing, pings, other events --------------------------------

def test_other_branches_tags_and_unknown_repositories_match_no_app(
        hook: Hook, rclient: redis.Redis) -> None:
    for provider, payload, event in [
        ("github", github_push("Acme/Shop", ref="refs/heads/develop"), "push"),
        ("github", github_push("Acme/Shop", ref="refs/tags/v1.0"), "push"),
        ("github", github_push("acme/shop", host="github.example.com"), "push"),
        ("github", github_push("acme/shop-old"), "push"),
        ("gitlab", gitlab_push("acme/blog", ref="refs/tags/v1.0", tag=True), "Tag Push Hook"),
        ("gitea", gitea_push("acme/other", ref="refs/heads/production"), "push"),
    ]:
        reply = hook.send(provider, payload, event=event)
        assert (reply.status, reply.body["status"], reply.body["apps"]) == (
            202, "unmatched", []), (provider, payload["ref"])
    assert queued_checks(rclient) == []
    assert rclient.get(keys.last_push("shop")) is None


def test_ping_is_answered_200_and_other_events_are_ignored(hook: Hook,
                                                           rclient: redis.Redis) -> None:
    ping = hook.send("github", github_ping("Acme/Shop"), event="ping")
    assert (ping.status, ping.body["status"]) == (200, "pong")
    issue = hook.send("github", {"action": "opened", "repository":
                                 github_push("Acme/Shop")["repository"]}, event="issues")
    assert (issue.status, issue.body["apps"], issue.body["status"]) == (202, [], "ignored")
    note = hook.send("gitlab", {"object_kind": "note"}, event="Note Hook")
    assert (note.status, note.body["apps"]) == (202, [])
    assert queued_checks(rclient) == []


# -- Bitbucket Cloud ----------------------------------------------------------------

def test_bitbucket_push_ping_signature_and_replay(hook: Hook, rclient: redis.Redis) -> None:
    delivery = str(uuid.uuid4())
    push = hook.send("bitbucket", bitbucket_push("Acme/Bucket"), event="repo:push",
                     delivery=delivery)
    assert (push.status, push.body["status"], push.body["apps"]) == (202, "queued", ["bucket"])
    again = hook.send("bitbucket", bitbucket_push("Acme/Bucket"), event="repo:push",
                      delivery=delivery)  # Bitbucket's retry keeps its X-Request-UUID
    assert (again.status, again.body["status"]) == (200, "duplicate")
    # Another delivery of the same webhook (same X-Hook-UUID) is a new push.
    other = hook.send("bitbucket", bitbucket_push("acme/bucket"), event="repo:push")
    assert other.status == 202 and other.body["apps"] == ["bucket"]
    ping = hook.send("bitbucket", {}, event="diagnostics:ping")
    assert (ping.status, ping.body["status"]) == (200, "pong")
    for payload, event in [(bitbucket_push("acme/bucket", "develop"), "repo:push"),
                           (bitbucket_push("acme/bucket", "v1.0", kind="tag"), "repo:push"),
                           (bitbucket_push("acme/elsewhere"), "repo:push"),
                           (bitbucket_push("acme/bucket"), "pullrequest:created")]:
        reply = hook.send("bitbucket", payload, event=event)
        assert reply.status == 202 and reply.body["apps"] == [], (event, reply.body)
    body, headers = signed("bitbucket", "not-the-secret", bitbucket_push("acme/bucket"),
                           event="repo:push")
    wrong = post(hook.port, "/hooks/bitbucket", body, headers)
    assert wrong.status == 401 and "X-Hub-Signature does not match" in wrong.body["error"]
    del headers["X-Hub-Signature"]
    assert post(hook.port, "/hooks/bitbucket", body, headers).status == 401
    # Matched by its web link alone, or by its full name alone.
    by_link = bitbucket_push("acme/bucket")
    del by_link["repository"]["full_name"]
    by_name = bitbucket_push("acme/bucket")
    del by_name["repository"]["links"]
    for payload in (by_link, by_name):
        assert hook.send("bitbucket", payload, event="repo:push").body["apps"] == ["bucket"]
    assert queued_checks(rclient) == ["bucket"]  # one check queued, the others joined it


def test_the_gitlab_token_is_not_a_signature(hook: Hook) -> None:
    body, headers = signed("gitlab", "not-the-secret", gitlab_push("acme/blog"))
    reply = post(hook.port, "/hooks/gitlab", body, headers)
    assert reply.status == 401
    assert reply.body["error"].startswith("X-Gitlab-Token is not the secret")
    assert "changed" not in reply.body["error"]


# -- pushes that delete the branch --------------------------------------------------

def _deleted_github() -> dict[str, Any]:
    return {**github_push("Acme/Shop", after=NO_COMMIT), "deleted": True, "head_commit": None}


def _deleted_gitlab() -> dict[str, Any]:
    return {**gitlab_push("acme/blog"), "after": NO_COMMIT, "checkout_sha": None,
            "commits": [], "total_commits_count": 0}


@pytest.mark.parametrize("provider,payload,event", [
    ("github", _deleted_github(), "push"),
    ("github", {**github_push("Acme/Shop", after=NO_COMMIT)}, "push"),
    ("gitea", {**gitea_push("acme/wiki", ref="refs/heads/production"), "after": NO_COMMIT},
     "push"),
    ("gitlab", _deleted_gitlab(), "Push Hook"),
    ("gitlab", {**gitlab_push("acme/blog"), "checkout_sha": None}, "Push Hook"),
    ("bitbucket", bitbucket_push("acme/bucket", None), "repo:push"),
    ("generic", {"repository": "https://github.com/acme/shop", "ref": "refs/heads/main",
                 "after": NO_COMMIT}, "push"),
])
def test_a_push_deleting_the_apps_branch_matches_nothing(
        hook: Hook, rclient: redis.Redis, provider: str, payload: Any, event: str) -> None:
    reply = hook.send(provider, payload, event=event)
    assert (reply.status, reply.body["status"], reply.body["apps"]) == (202, "ignored", [])
    assert "deletes its branch" in reply.body["reason"]
    assert queued_checks(rclient) == []


# -- whatever a signed sender sends: 2xx or 4xx, never 500 --------------------------

def _nested(depth: int, key: str | None = None) -> bytes:
    if key is None:
        return b"[" * depth + b"]" * depth
    return (b'{"%s": ' % key.encode()) * depth + b"{}" + b"}" * depth


HOSTILE = [
    ("github", _nested(50_000)),
    ("gitlab", _nested(50_000, "project")),
    ("generic", _nested(50_000, "repository")),
    ("bitbucket", _nested(50_000, "push")),
    ("generic", json.dumps({"repository": "/srv/shop\u0000.git",
                            "ref": "refs/heads/main"}).encode()),
    ("generic", json.dumps({"repository": "/srv/\u0001shop\n"}).encode()),
    ("github", json.dumps({**github_push("Acme/Shop"),
                           "repository": {"clone_url": "/tmp/x\u0000y", "html_url": 7,
                                          "default_branch": ["main"]}}).encode()),
    ("generic", json.dumps({"app": "sh\u0000op"}).encode()),
    ("generic", json.dumps({"app": ["shop", None]}).encode()),
    ("generic", json.dumps({"repository": {"clone_url": ["x"]}, "ref": {"a": 1}}).encode()),
    ("github", json.dumps({"ref": 5, "repository": [1, 2], "deleted": "yes"}).encode()),
    ("gitlab", json.dumps({"object_kind": ["push"], "project": "x"}).encode()),
    ("gitlab", json.dumps({"object_kind": "push", "project": {"default_branch": 3},
                           "repository": None, "ref": None}).encode()),
    ("bitbucket", json.dumps({"push": {"changes": "all"}, "repository": "x"}).encode()),
    ("bitbucket", json.dumps({"push": {"changes": [1, None, {"new": 5},
                                                   {"new": {"type": "branch", "name": 3}}]},
                              "repository": {"links": {"html": {"href": None}},
                                             "full_name": ["a"]}}).encode()),
    ("gitea", b"3"), ("gitea", b"null"), ("gitea", b'"text"'), ("gitea", b"1e999999"),
    ("github", br'{"ref": "refs/heads/main\u0000", "repository": {"url": "\ud800"}}'),
]


@pytest.mark.parametrize("provider,body", HOSTILE, ids=range(len(HOSTILE)))
def test_any_signed_body_is_answered_2xx_or_4xx(hook: Hook, rclient: redis.Redis,
                                                provider: str, body: bytes) -> None:
    event = {"bitbucket": "repo:push", "gitlab": "Push Hook"}.get(provider, "push")
    _, headers = signed(provider, SECRET, None, event=event, body=body)
    reply = post(hook.port, f"/hooks/{provider}", body, headers)
    assert 200 <= reply.status < 500, (reply.status, reply.body)
    assert queued_checks(rclient) == []
    assert "Traceback" not in hook.service.log()


# -- replays ------------------------------------------------------------------------

@pytest.mark.parametrize("provider,payload,event", [
    ("github", github_push("Acme/Shop"), "push"),
    ("gitea", gitea_push("acme/wiki", ref="refs/heads/production"), "push"),
    ("gitlab", gitlab_push("acme/blog"), "Push Hook"),
    ("generic", {"app": "shop"}, "push"),
])
def test_a_replayed_delivery_is_answered_200_and_queues_nothing(
        hook: Hook, rclient: redis.Redis, provider: str, payload: Any, event: str) -> None:
    delivery = str(uuid.uuid4())
    first = hook.send(provider, payload, event=event, delivery=delivery)
    assert first.status == 202 and len(first.body["apps"]) == 1
    again = hook.send(provider, payload, event=event, delivery=delivery)
    assert (again.status, again.body["status"], again.body["apps"]) == (200, "duplicate", [])
    assert queued_checks(rclient) == first.body["apps"]
    ttl = rclient.ttl(keys.webhook_delivery(provider, delivery))
    assert 0 < ttl <= 7 * 86_400


def test_concurrent_copies_of_one_delivery_queue_one_check(hook: Hook,
                                                           rclient: redis.Redis) -> None:
    body, headers = signed("github", SECRET, github_push("Acme/Shop"), delivery="same-id")
    answers = post_concurrently(hook.port, [raw_request("/hooks/github", body, headers)] * 20)
    statuses = sorted(status for status, _ in answers)
    assert statuses == [200] * 19 + [202]
    assert queued_checks(rclient) == ["shop"]


# -- bad requests -------------------------------------------------------------------

@pytest.mark.parametrize("provider,header,payload", [
    ("github", "X-Hub-Signature-256", github_push("Acme/Shop")),
    ("gitea", "X-Gitea-Signature", gitea_push("acme/wiki", ref="refs/heads/production")),
    ("gitlab", "X-Gitlab-Token", gitlab_push("acme/blog")),
    ("generic", "X-Signature", {"app": "shop"}),
])
def test_bad_or_missing_signature_is_401_and_queues_nothing(
        hook: Hook, rclient: redis.Redis, provider: str, header: str, payload: Any) -> None:
    delivery = str(uuid.uuid4())
    body, headers = signed(provider, "not-the-secret", payload, delivery=delivery)
    wrong = post(hook.port, f"/hooks/{provider}", body, headers)
    assert wrong.status == 401 and header in wrong.body["error"]
    del headers[header]
    missing = post(hook.port, f"/hooks/{provider}", body, headers)
    assert missing.status == 401 and f"missing {header}" in missing.body["error"]
    # A body changed on the way no longer matches a good signature.
    good_body, good_headers = signed(provider, SECRET, payload, delivery=delivery)
    if provider != "gitlab":  # GitLab's token does not sign the body
        changed = post(hook.port, f"/hooks/{provider}", good_body + b" ", good_headers)
        assert changed.status == 401
    assert queued_checks(rclient) == []
    assert rclient.keys(keys.PREFIX + "webhook:*") == []
    # The rejected attempts did not burn the delivery id.
    assert post(hook.port, f"/hooks/{provider}", good_body, good_headers).status == 202


def test_wrong_content_type_is_400(hook: Hook, rclient: redis.Redis) -> None:
    # GitHub's other content type: the JSON form-encoded in a `payload` field.
    form = b"payload=" + json.dumps(github_push("Acme/Shop")).encode()
    headers = {"Content-Type": "application/x-www-form-urlencoded",
               "X-GitHub-Event": "push", "X-Hub-Signature-256": hub_signature(SECRET, form)}
    reply = post(hook.port, "/hooks/github", form, headers)
    assert reply.status == 400
    assert "application/x-www-form-urlencoded" in reply.body["error"]
    assert "send application/json" in reply.body["error"]
    assert queued_checks(rclient) == []


@pytest.mark.parametrize("body,message", [
    (json.dumps(github_push("Acme/Shop")).encode()[:300], "not valid JSON (truncated?)"),
    (b"ref=refs/heads/main", "not valid JSON"),
    (b"", "not valid JSON"),
    (b'["refs/heads/main"]', "must be a JSON object, not list"),
    (b'{"ref": "\xff\xfe"}', "not UTF-8 JSON"),
])
def test_truncated_or_non_json_body_is_400(hook: Hook, rclient: redis.Redis, body: bytes,
                                           message: str) -> None:
    _, headers = signed("github", SECRET, None, body=body)
    reply = post(hook.port, "/hooks/github", body, headers)
    assert reply.status == 400 and message in reply.body["error"], reply.body
    assert queued_checks(rclient) == []


def test_generic_body_of_the_wrong_shape_is_400(hook: Hook) -> None:
    for payload in ({"name": "shop"}, {"app": 3}, {"repository": "x", "ref": "main"}):
        reply = hook.send("generic", payload)
        assert reply.status == 400 and "error" in reply.body, payload


def test_oversized_body_is_413_before_it_is_read(hook: Hook, rclient: redis.Redis) -> None:
    _, headers = signed("github", SECRET, github_push("Acme/Shop"))
    head = raw_request("/hooks/github", b"", headers).replace(
        b"Content-Length: 0", f"Content-Length: {1024 * 1024 + 1}".encode())
    with socket.create_connection(("127.0.0.1", hook.port), timeout=10) as sock:
        sock.sendall(head)  # headers only: the answer must not wait for the body
        answer = _read_all(sock)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"the limit is 1048576 bytes" in answer
    # Without a Content-Length (chunked), the read stops keeping bytes at the limit.
    chunk = b"x" * 65536
    chunked = (b"POST /hooks/github HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
               b"Transfer-Encoding: chunked\r\n"
               + "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode() + b"\r\n"
               + (b"10000\r\n" + chunk + b"\r\n") * 24 + b"0\r\n\r\n")
    with socket.create_connection(("127.0.0.1", hook.port), timeout=10) as sock:
        sock.sendall(chunked)
        answer = _read_all(sock)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert queued_checks(rclient) == []
    assert healthy(hook.port)


def test_a_body_cut_off_in_transit_queues_nothing(hook: Hook, rclient: redis.Redis) -> None:
    body, headers = signed("github", SECRET, github_push("Acme/Shop"))
    request = raw_request("/hooks/github", body, headers)
    with socket.create_connection(("127.0.0.1", hook.port), timeout=10) as sock:
        sock.sendall(request[:-200])  # the sender dies mid-body
        sock.shutdown(socket.SHUT_WR)
        assert _read_all(sock) == b""  # nothing to answer: the request never completed
    assert queued_checks(rclient) == []
    assert hook.service.alive() and healthy(hook.port)
    assert hook.send("github", github_push("Acme/Shop")).status == 202


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_deliveries_on_one_kept_alive_connection(hook: Hook, rclient: redis.Redis) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", hook.port, timeout=10)
    try:
        for payload in (github_push("Acme/Shop"), github_push("Acme/Shop", ref="refs/tags/v2")):
            body, headers = signed("github", SECRET, payload)
            connection.request("POST", "/hooks/github", body=body, headers=headers)
            response = connection.getresponse()
            response.read()
            assert response.status == 202 and not response.will_close
    finally:
        connection.close()
    assert queued_checks(rclient) == ["shop"]


def test_unknown_endpoint_and_method(hook: Hook) -> None:
    body, headers = signed("github", SECRET, github_push("Acme/Shop"))
    reply = post(hook.port, "/hooks/bitbucket-server", body, headers)
    assert reply.status == 404 and "/hooks/github" in reply.body["error"]
    assert "/hooks/bitbucket" in reply.body["error"]
    for method in ("GET", "HEAD", "PUT"):
        request = urllib.request.Request(f"http://127.0.0.1:{hook.port}/hooks/github",
                                         method=method)
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=5)
        assert info.value.code == 405 and info.value.headers["Allow"] == "POST"
    head = urllib.request.Request(f"http://127.0.0.1:{hook.port}/healthz", method="HEAD")
    with urllib.request.urlopen(head, timeout=5) as response:
        assert response.status == 200 and response.read() == b""
    assert hook.service.alive() and healthy(hook.port)


# -- status -------------------------------------------------------------------------

def test_status_shows_when_the_last_push_arrived(hook: Hook, rclient: redis.Redis) -> None:
    assert hook.send("github", github_push("Acme/Shop")).status == 202
    env = {**hook.env}
    result = cli(hook.state_dir, "status", "--json", env=env)
    assert result.returncode == 0, result.stderr
    rows = {row["app"]: row for row in json.loads(result.stdout)["apps"]}
    assert time.time() - rows["shop"]["last_push_at"] < 60
    assert rows["blog"]["last_push_at"] is None
    table = cli(hook.state_dir, "status", env=env).stdout.splitlines()
    assert table[0].split()[-2:] == ["LAST", "PUSH"]
    shop = next(line for line in table if line.startswith("shop"))
    assert shop.endswith("s ago"), shop
    blog = next(line for line in table if line.startswith("blog"))
    assert blog.endswith("-"), blog


@pytest.mark.skipif(not (shutil.which("openssl") and shutil.which("curl")),
                    reason="needs openssl and curl")
def test_the_docs_generic_hook_example_works(hook: Hook, rclient: redis.Redis) -> None:
    readme = (REPO_ROOT / "docs" / "webhooks.md").read_text()
    example = readme.split("signed like GitHub's:\n\n```sh\n", 1)[1].split("```", 1)[0]
    example = example.replace("127.0.0.1:9810", f"127.0.0.1:{hook.port}")
    result = subprocess.run(["bash", "-c", example], capture_output=True, text=True,
                            env={**hook.env}, timeout=30)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"status": "queued", "apps": ["shop"],
                                         "delivery": None}
    assert queued_checks(rclient) == ["shop"]
