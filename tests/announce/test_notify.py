"""Notifications end to end: a real HTTP receiver behind json:// Apprise URLs, real workers."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis

from postdeploy.config.notify import mask_url, url_secrets
from postdeploy.config.settings import Settings
from postdeploy.errors import ConfigError
from postdeploy.store import keys
from postdeploy.store.records import RunRecord
from tests.faults.harness import crash_host, dump_redis, leaks
from tests.support.clirun import cli, cli_env, interrupt, start_up
from tests.support.core import (
    GitRemote,
    Service,
    appspec_yaml,
    finished_runs,
    free_port,
    output_of,
    runs,
    service_env,
    wait_for,
)

Start = Callable[..., Service]
EnvFor = Callable[..., dict[str, str]]


class Receiver:
    """A webhook endpoint in a thread: answers ``ok`` (200), ``500``, ``slow`` (30 s),
    ``flaky`` (500 to the first request, then 200) or ``dribble`` (its answer a byte
    every 0.5 s, for ever); keeps every accepted message."""

    def __init__(self, mode: str = "ok", slow_for: float = 30.0) -> None:
        self.mode = mode
        self.slow_for = slow_for
        self.port = free_port()
        self.requests = 0
        self.messages: list[dict[str, Any]] = []
        self._release = threading.Event()
        self._server: ThreadingHTTPServer | None = None

    def url(self, path: str = "hook", auth: str = "") -> str:
        return f"json://{auth}127.0.0.1:{self.port}/{path}"

    def start(self) -> Receiver:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                owner.requests += 1
                if owner.mode == "dribble":  # under any read timeout, never complete
                    self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                    while not owner._release.wait(0.5):
                        try:
                            self.wfile.write(b"X")
                            self.wfile.flush()
                        except OSError:
                            return  # the sender gave up
                    return
                if owner.mode == "slow":
                    owner._release.wait(owner.slow_for)
                failing = owner.mode == "500" or (owner.mode == "flaky" and owner.requests == 1)
                if not failing:
                    owner.messages.append(json.loads(body))
                try:
                    self.send_response(500 if failing else 200)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:
                    pass  # the slow case: the client gave up long ago

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def wait(self, count: int, timeout: float = 60) -> list[dict[str, Any]]:
        wait_for(lambda: len(self.messages) >= count, timeout,
                 what=f"{count} message(s) at the receiver (got {self.messages!r})")
        return list(self.messages)

    def titles(self) -> list[str]:
        return [m["title"] for m in self.messages]


@pytest.fixture
def receivers() -> Any:
    started: list[Receiver] = []

    def make(mode: str = "ok") -> Receiver:
        receiver = Receiver(mode).start()
        started.append(receiver)
        return receiver

    yield make
    for receiver in started:
        receiver.stop()


def wait_run(client: redis.Redis, count: int, timeout: float = 40) -> RunRecord:
    """The ``count``-th finished run of shop (oldest first), once it exists."""
    found = wait_for(lambda: (r := finished_runs(client, "shop")) and len(r) >= count and r,
                     timeout, what=f"{count} finished run(s)")
    return found[count - 1]


def counters(client: redis.Redis) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in client.hgetall(keys.NOTIFICATIONS_TOTAL).items()}


def test_failure_timeout_recovery_and_error_each_notified_once(
        remote: GitRemote, rclient: redis.Redis, services: Start, env_for: EnvFor,
        receivers: Callable[..., Receiver]) -> None:
    receiver = receivers()
    token = "abc123TOKENxyz"  # part of the notify URL: never shown anywhere
    job = ("for i in $(seq 1 30); do echo line $i; done; echo db=$DB_PASSWORD; "
           f"echo token={token}; echo dsn=redis://admin:hunter22@db:6379/0; exit 3")
    sha1 = remote.commit({"appspec.yaml": appspec_yaml(job, secrets={"DB_PASSWORD": "s3cretV4l"})})
    env = env_for(remote, POSTDEPLOY_NOTIFY=receiver.url(f"hooks/{token}"))
    worker = services("worker", env)
    services("beat", env)

    first = wait_run(rclient, 1)
    assert first.status == "failed"
    message = receiver.wait(1)[0]
    assert message["title"] == f"postdeploy: shop@{sha1[:7]} failed"
    assert message["type"] == "failure"
    text = message["message"]
    for expected in ("App: shop", f"Commit: {sha1}", "Previous commit: -\n",
                     "Status: failed (exit code 3)",
                     "Reason: exited with code 3", "Trigger: auto", "Duration: ",
                     f"Host: {first.worker}", f"Run: {first.id}", "Last 20 lines of output:",
                     "line 14", "line 30", "db=***", "token=***", "redis://***@db:6379/0",
                     f"More: postdeploy logs shop {first.id}"):
        assert expected in text, (expected, text)
    for hidden in ("line 13\n", "s3cretV4l", token, "hunter22"):
        assert hidden not in text, hidden
    assert f"hooks/{token}" not in worker.log()  # the job printed the token; we never did

    sha2 = remote.commit({"appspec.yaml": appspec_yaml("echo slow; sleep 30", timeout="1")})
    assert wait_run(rclient, 2).status == "timed_out"
    assert receiver.wait(2)[1]["title"] == f"postdeploy: shop@{sha2[:7]} timed out"
    assert f"Previous commit: {sha1}" in receiver.wait(2)[1]["message"]  # what it replaced

    sha3 = remote.commit({"appspec.yaml": appspec_yaml("echo fixed")})
    third = wait_run(rclient, 3)
    assert third.status == "succeeded"
    recovered = receiver.wait(3)[2]
    assert recovered["title"] == f"postdeploy: shop@{sha3[:7]} recovered"
    assert recovered["type"] == "success"
    assert "timed_out" in recovered["message"] and f"logs shop {third.id}" in recovered["message"]

    # A second success in a row says nothing: the app is no longer failing.
    remote.commit({"appspec.yaml": appspec_yaml("echo still fine")})
    fourth = wait_run(rclient, 4)
    assert fourth.status == "succeeded"
    assert not rclient.keys(keys.notified(fourth.id, "*"))

    sha5 = remote.commit({"appspec.yaml": appspec_yaml("echo x", folder="missing")})
    assert wait_run(rclient, 5).status == "error"
    receiver.wait(4)
    wait_for(lambda: counters(rclient).get("sent") == 4, 20, what="4 sent in the counter")
    assert receiver.titles() == [f"postdeploy: shop@{sha1[:7]} failed",
                                 f"postdeploy: shop@{sha2[:7]} timed out",
                                 f"postdeploy: shop@{sha3[:7]} recovered",
                                 f"postdeploy: shop@{sha5[:7]} could not run"]
    assert "POST_DEPLOY_FOLDER 'missing' does not exist" in receiver.messages[3]["message"]
    assert receiver.requests == 4 and counters(rclient) == {"sent": 4}


def test_lost_run_is_notified_once_and_its_rerun_recovers(
        remote: GitRemote, rclient: redis.Redis, services: Start, env_for: EnvFor,
        receivers: Callable[..., Receiver], tmp_path: Path) -> None:
    receiver = receivers()
    mark = tmp_path / "first-attempt"
    job = f"if [ -e {mark} ]; then echo second; exit 0; fi; touch {mark}; echo first; sleep 60"
    sha = remote.commit({"appspec.yaml": appspec_yaml(job)})
    env = env_for(remote, POSTDEPLOY_NOTIFY=receiver.url())
    worker_a = services("worker", env, "worker-a")
    services("beat", env)
    running = wait_for(lambda: mark.exists() and next(
        (r for r in runs(rclient, "shop") if r.status == "running"), None), 40,
        what="the first attempt to run")
    wait_for(lambda: "first" in output_of(rclient, running.id), 10, what="its output stored")

    crash_host(worker_a, [running.id])
    services("worker", env, "worker-b")
    messages = receiver.wait(2, timeout=60)
    assert [m["title"] for m in messages] == [f"postdeploy: shop@{sha[:7]} was lost",
                                              f"postdeploy: shop@{sha[:7]} recovered"]
    lost_text = messages[0]["message"]
    assert "Status: lost" in lost_text and "its worker stopped mid-run" in lost_text
    assert f"Host: {running.worker}" in lost_text and "first" in lost_text
    assert [r.status for r in finished_runs(rclient, "shop")] == ["lost", "succeeded"]
    wait_for(lambda: counters(rclient).get("sent") == 2, 20, what="2 sent in the counter")
    assert len(receiver.messages) == 2


def test_unreachable_receivers_change_nothing_and_the_worker_goes_on(
        remote: GitRemote, rclient: redis.Redis, services: Start, env_for: EnvFor,
        receivers: Callable[..., Receiver]) -> None:
    down = Receiver()  # never started: connection refused
    failing, slow, flaky, good = (receivers("500"), receivers("slow"), receivers("flaky"),
                                  receivers())
    urls = [down.url("tok3nDOWN1"), failing.url("tok3nFIVE00"), slow.url("tok3nSLOW30"),
            flaky.url("tok3nFLAKY1"), good.url("tok3nGOOD11")]
    remote.commit({"appspec.yaml": appspec_yaml("echo broken; exit 3")})
    env = env_for(remote, POSTDEPLOY_NOTIFY=",".join(urls), POSTDEPLOY_NOTIFY_BACKOFF="2")
    worker = services("worker", env)
    services("beat", env)

    first = wait_run(rclient, 1)
    assert first.status == "failed"
    stored = rclient.get(keys.run(first.id))
    wait_for(lambda: slow.requests >= 1, 20, what="the slow receiver to be called")
    # The next job runs while the notifications of the first wait and retry.
    remote.commit({"appspec.yaml": appspec_yaml("echo fixed")})
    started = time.monotonic()
    second = wait_run(rclient, 2, timeout=30)
    assert second.status == "succeeded"
    assert time.monotonic() - started < 20
    # The first message was still being retried meanwhile: 4 tries of about 4 s each
    # (the slow receiver's request is cut at Apprise's read timeout) 2, 4 and 8 s apart.
    assert counters(rclient).get("failed", 0) < 3

    # Two messages (failed, recovered) x three dead URLs; the others got each one once.
    wait_for(lambda: counters(rclient).get("failed") == 6, 90, what="6 failed in the counter")
    wait_for(lambda: counters(rclient).get("sent") == 4, 10, what="4 sent in the counter")
    assert sorted(good.titles()) == sorted(flaky.titles()) and len(good.messages) == 2
    assert flaky.requests == 3  # the retry went only to the URLs that had failed
    assert slow.requests == 8 and failing.requests == 8  # 4 tries of each message
    assert rclient.get(keys.run(first.id)) == stored
    assert [r.status for r in finished_runs(rclient, "shop")] == ["failed", "succeeded"]
    log = worker.log()
    assert f"could not send the failed notification of run {first.id}" in log
    assert f"to json://127.0.0.1:{slow.port}/... after 4 tries" in log
    assert "WARNING" in log and worker.alive()
    # Task messages and logs name URLs only masked or by fingerprint.
    tokens = ["tok3nDOWN1", "tok3nFIVE00", "tok3nSLOW30", "tok3nFLAKY1", "tok3nGOOD11"]
    assert leaks({"worker log": log, **{k.decode(): v for k, v in dump_redis(rclient)}},
                 tokens) == []

    # The worker still runs jobs.
    remote.commit({"appspec.yaml": appspec_yaml("echo third")})
    third = wait_run(rclient, 3)
    assert third.status == "succeeded" and "third" in output_of(rclient, third.id)


def test_a_dribbling_receiver_frees_the_worker_at_the_send_deadline(
        remote: GitRemote, rclient: redis.Redis, services: Start, env_for: EnvFor,
        receivers: Callable[..., Receiver]) -> None:
    dribble = receivers("dribble")
    remote.commit({"appspec.yaml": appspec_yaml("echo broken; exit 3")})
    # One pool process: while the notification holds it, no other job can start.
    env = env_for(remote, POSTDEPLOY_NOTIFY=dribble.url("tok3nDRIBBLE"),
                  POSTDEPLOY_NOTIFY_BACKOFF="60", POSTDEPLOY_CONCURRENCY="1")
    worker = services("worker", env)
    services("beat", env)

    assert wait_run(rclient, 1).status == "failed"
    wait_for(lambda: dribble.requests >= 1, 30, what="the notification to reach the receiver")
    sent_at = time.monotonic()
    sha = remote.commit({"appspec.yaml": appspec_yaml("echo next")})
    run = wait_for(lambda: next((r for r in runs(rclient, "shop")
                                 if r.sha == sha and r.started_at), None), 45,
                   what="the next job to start while the receiver still dribbles")
    waited = time.monotonic() - sent_at
    assert waited < 10 + 15, waited  # the send deadline, and the machine's load
    assert wait_run(rclient, 2).status == "succeeded" and run.sha == sha
    wait_for(lambda: "no complete answer within 10 s" in worker.log(), 10,
             what="the failed try in the worker's log")
    assert "tok3nDRIBBLE" not in worker.log() and worker.alive()


def test_notify_test_command(receivers: Callable[..., Receiver], tmp_path: Path,
                             remote: GitRemote) -> None:
    good, bad = receivers(), receivers("500")
    state = tmp_path / "state"
    state.parent.mkdir(parents=True, exist_ok=True)
    good_url = good.url("hook", auth="ops:pa55word@")

    result = cli(state, "notify", "--test", env=cli_env(POSTDEPLOY_NOTIFY=good_url))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"ok      json://ops:****@127.0.0.1:{good.port}/...\n"
    assert good.titles() == ["postdeploy: test notification"]

    result = cli(state, "notify", "--test",
                 env=cli_env(POSTDEPLOY_NOTIFY=f"{good_url} {bad.url('tok3nBAD123')}"))
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[0].startswith("ok      ") and lines[1].startswith(
        f"FAILED  json://127.0.0.1:{bad.port}/...: ") and "500" in lines[1]
    assert "pa55word" not in result.stdout + result.stderr
    assert "tok3nBAD123" not in result.stdout + result.stderr

    # Per app: the app's own URLs (with the global ones); an app without any is exit 2.
    config = tmp_path / "postdeploy.yaml"
    config.write_text(json.dumps({"apps": [
        {"name": "shop", "repo": remote.url, "notify": [good.url("shop-hook")]},
        {"name": "blog", "repo": remote.url}]}))
    result = cli(state, "--config", str(config), "notify", "--test", "shop")
    assert result.returncode == 0, result.stderr
    assert good.titles()[-1] == "postdeploy: test notification"
    assert "app shop" in good.messages[-1]["message"]
    for args, expected in (
            (["--config", str(config), "notify", "--test", "blog"],
             "no notification URLs configured"),
            (["--config", str(config), "notify", "--test", "nope"], "unknown app 'nope'"),
            (["notify"], "use `postdeploy notify --test [APP]`")):
        result = cli(state, *args)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.startswith("postdeploy: error: ") and expected in result.stderr
        assert len(result.stderr.splitlines()) == 1


@pytest.mark.parametrize("variable, value, expected", [
    ("POSTDEPLOY_NOTIFY", "slakk://ops:pa55word@hooks.example/T0K3N123",
     "invalid POSTDEPLOY_NOTIFY: 'slakk://***': Apprise has no service 'slakk://'"),
    ("POSTDEPLOY_NOTIFY", "json://127.0.0.1/x,discord://onlyone",
     "'discord://***' is not a valid 'discord://' URL"),
    ("POSTDEPLOY_NOTIFY_ON", "failed,faild", "invalid POSTDEPLOY_NOTIFY_ON: 'faild'"),
    ("POSTDEPLOY_NOTIFY_BACKOFF", "soon", "invalid POSTDEPLOY_NOTIFY_BACKOFF: 'soon'"),
])
def test_bad_settings_stop_worker_beat_and_up(
        variable: str, value: str, expected: str, remote: GitRemote, redis_url: str,
        tmp_path: Path) -> None:
    env = service_env(redis_url, tmp_path / "state", POSTDEPLOY_REPO=remote.url,
                      **{variable: value})
    for module in ("worker", "beat"):
        log = tmp_path / f"{module}.log"
        service = Service(["-m", module], env, log)
        assert service.proc.wait(60) == 2
        service.stop()
        text = log.read_text()
        assert expected in text and "pa55word" not in text and "T0K3N123" not in text
        assert len(text.strip().splitlines()) == 1 and "Traceback" not in text
    result = cli(tmp_path / "state", "up", "--repo", remote.url,
                 env=cli_env(**{variable: value}))
    assert result.returncode == 2 and result.stderr.startswith("postdeploy: error: ")
    assert expected in result.stderr and len(result.stderr.splitlines()) == 1
    assert "pa55word" not in result.stderr


def test_up_notifies_and_shows_notify_urls_masked(remote: GitRemote, tmp_path: Path,
                                                  receivers: Callable[..., Receiver]) -> None:
    sha = remote.commit({"appspec.yaml": appspec_yaml("echo broken; exit 1")})
    receiver = receivers()
    url = receiver.url("tok3nBANNER9", auth="ops:pa55word@")
    up = start_up(tmp_path, remote, tmp_path / "state", POSTDEPLOY_NOTIFY=url)
    try:
        # up's worker got the setting: the failed run is notified.
        message = receiver.wait(1)[0]
        assert message["title"] == f"postdeploy: shop@{sha[:7]} failed"
    finally:
        assert interrupt(up) == 0
    log = up.log()
    assert f"  notify  json://ops:****@127.0.0.1:{receiver.port}/... " in log
    assert "(on error, failed, lost, recovered, timed_out)" in log
    assert f"failed notification sent to json://ops:****@127.0.0.1:{receiver.port}/..." in log
    assert "pa55word" not in log and "tok3nBANNER9" not in log


def test_notify_settings_from_environment_and_file(tmp_path: Path) -> None:
    settings = Settings.load({"POSTDEPLOY_NOTIFY": "json://a.example/x, form://b.example/y "
                                                   "mailto://u:pw@mail.example?to=a@x.org,b@x.org",
                              "POSTDEPLOY_NOTIFY_ON": "failed cancelled,succeeded"})
    assert settings.notify == ("json://a.example/x", "form://b.example/y",
                               "mailto://u:pw@mail.example?to=a@x.org,b@x.org")
    assert settings.notify_on == {"failed", "cancelled", "succeeded"}

    config = tmp_path / "postdeploy.yaml"
    config.write_text("notify: json://global.example/g\n"
                      "apps:\n"
                      "  - {name: shop, path: ., notify: json://shop.example/s}\n"
                      "  - {name: blog, path: ., notify: [json://b1.example/1, "
                      "json://b2.example/2]}\n")
    settings = Settings.load({"POSTDEPLOY_CONFIG": str(config)})
    assert settings.notify == ("json://global.example/g",)
    shop, blog = settings.apps
    assert shop.notify == ("json://shop.example/s",)
    assert blog.notify == ("json://b1.example/1", "json://b2.example/2")
    assert "shop.example" not in json.dumps(shop.describe())  # the registry in Redis: no URLs

    config.write_text("apps:\n  - {name: shop, path: ., notify: {url: x}}\n")
    with pytest.raises(ConfigError, match="app 'shop': invalid 'notify': give an Apprise URL"):
        Settings.load({"POSTDEPLOY_CONFIG": str(config)})
    config.write_text("notify: [json://ok.example/x, slakk://ops:pa55word@x]\nnotify_on: faild\n")
    with pytest.raises(ConfigError, match=r"postdeploy.yaml: invalid 'notify': 'slakk://\*\*\*'"):
        Settings.load({"POSTDEPLOY_CONFIG": str(config)})
    config.write_text("notify_on: [failed, faild]\n")
    with pytest.raises(ConfigError, match="postdeploy.yaml: invalid 'notify_on': 'faild' is not"):
        Settings.load({"POSTDEPLOY_CONFIG": str(config)})


def test_masking_helpers() -> None:
    slack = "slack://T1JJ3T3L2/A1BRTD4JD/TIiajkdnlazkcOXrIdevi7FQ"
    assert mask_url(slack) == "slack://T...2/..."
    assert mask_url("json://u:pw@127.0.0.1:9/a/b") == "json://u:****@127.0.0.1:9/..."
    assert mask_url("nonsense://x:y@z") == "nonsense://***"
    assert {"T1JJ3T3L2", "A1BRTD4JD", "TIiajkdnlazkcOXrIdevi7FQ"} <= url_secrets(slack)
    assert "127.0.0.1:9" not in url_secrets("json://127.0.0.1:9/plain")


def test_message_masks_every_secret_the_executor_knows(rclient: redis.Redis) -> None:
    from postdeploy.announce.notify import compose
    from postdeploy.config.settings import AppConfig
    from postdeploy.store.state import StateStore

    settings = Settings(
        redis_url="redis://:R3disPassw0rd@127.0.0.1:1/0",
        apps=(AppConfig("shop", repo="https://deploy:ghT0ken12345@git.example/acme/shop.git",
                        notify=("json://ops:N0tifyPw@127.0.0.1:9/hook/abc123TOKENxyz",)),),
        notify=("slack://T1JJ3T3L2/A1BRTD4JD/TIiajkdnlazkcOXrIdevi7FQ",))
    store = StateStore(rclient)
    record = RunRecord.new("shop", "a" * 40, "auto")
    record.status, record.exit_code, record.reason = "failed", 1, "exited with code 1"
    store.add_run(record)
    printed = (b"R3disPassw0rd ghT0ken12345 N0tifyPw abc123TOKENxyz TIiajkdnlazkcOXrIdevi7FQ\n"
               b"\x1b[31mred\x1b[0m\n" + b"x" * 400 + b"\n")
    store.write_output(record.id, printed, len(printed))
    message = compose(settings, store, record, "failed")
    for secret in ("R3disPassw0rd", "ghT0ken12345", "N0tifyPw", "abc123TOKENxyz",
                   "TIiajkdnlazkcOXrIdevi7FQ"):
        assert secret not in message.body, secret
    assert "*** *** *** *** ***" in message.body
    assert "\\x1b[31mred\\x1b[0m" in message.body and "\x1b" not in message.body
    assert f"More: postdeploy logs shop {record.id}" in message.body
    assert "x" * 300 + "..." in message.body and "x" * 301 not in message.body
    assert message.title == "postdeploy: shop@aaaaaaa failed"
