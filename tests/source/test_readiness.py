"""The readiness gate against a real local HTTP server, and its appspec keys."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from postdeploy.errors import AppSpecError
from postdeploy.source.appspec import parse_appspec
from postdeploy.source.readiness import (
    PROBE_BODY_LIMIT,
    Gate,
    check_url,
    gate_url,
    not_ready_reason,
    probe,
)
from tests.support.clirun import cli
from tests.support.core import appspec_yaml, free_port
from tests.support.standin import AppStandIn

SHA = "0123456789abcdef0123456789abcdef01234567"
OTHER = "fedcba9876543210fedcba9876543210fedcba98"

@pytest.fixture
def app() -> Iterator[AppStandIn]:
    stand_in = AppStandIn(SHA)
    yield stand_in
    stand_in.close()

def test_ready_when_it_answers_2xx_with_the_commit(app: AppStandIn) -> None:
    assert probe(app.url).ready
    assert probe(app.url, SHA).ready
    app.version = SHA[:7]  # the short form is enough
    assert probe(app.url, SHA).ready
    app.version = SHA[:6]  # shorter could match by chance
    assert probe(app.url, SHA) == probe(app.url, SHA) and not probe(app.url, SHA).ready

def test_the_previous_version_is_not_ready(app: AppStandIn) -> None:
    app.version = OTHER
    result = probe(app.url, SHA)
    assert not result.ready
    assert result.answer == f"200 without commit {SHA[:7]}"
    assert probe(app.url).ready  # without WAIT_FOR_COMMIT any 2xx will do

def test_a_502_is_not_ready(app: AppStandIn) -> None:
    app.mode = "502"
    assert probe(app.url) == probe(app.url)
    result = probe(app.url)
    assert (result.ready, result.answer) == (False, "502")
    assert not_ready_reason(app.url, result, 300.4) == (
        f"not ready: {app.url} last answered 502 after 300 s")

def test_nothing_listening_is_not_ready() -> None:
    result = probe(f"http://127.0.0.1:{free_port()}/health")
    assert (result.ready, result.answer) == (False, "connection refused")

def test_a_hanging_endpoint_is_bounded(app: AppStandIn) -> None:
    app.mode = "hang"
    started = time.monotonic()
    result = probe(app.url, timeout=1.0)
    took = time.monotonic() - started
    assert (result.ready, result.answer) == (False, "nothing within 1 s")
    assert took < 3.0

def test_a_redirect_loop_is_bounded(app: AppStandIn) -> None:
    app.mode = "loop"
    started = time.monotonic()
    result = probe(app.url)
    assert not result.ready
    assert result.answer.startswith("302, a redirect loop")
    assert app.requests <= 6  # the first request and at most five redirects
    assert time.monotonic() - started < 3.0

def test_a_10_mb_answer_is_read_up_to_the_cap(app: AppStandIn) -> None:
    app.mode = "big"
    started = time.monotonic()
    result = probe(app.url, SHA)
    assert (result.ready, result.answer) == (False, f"200 without commit {SHA[:7]}")
    assert time.monotonic() - started < 3.0
    assert PROBE_BODY_LIMIT == 64 * 1024
    assert probe(app.url).ready  # a big 2xx without WAIT_FOR_COMMIT: the body is not read

@pytest.mark.parametrize(("url", "problem"), [
    ("file:///etc/passwd", "uses file://"),
    ("gopher://localhost:70/", "uses gopher://"),
    ("ftp://localhost/", "uses ftp://"),
    ("localhost:8080/health", "uses localhost://"),
    ("/health", "uses no scheme"),
    ("http://user:secret@localhost/health", "carries credentials"),
    ("http://token@localhost/health", "carries credentials"),
    ("http:///health", "has no host"),
    ("http://localhost:99999/", "not a valid URL"),
])
def test_only_plain_http_urls(url: str, problem: str) -> None:
    with pytest.raises(AppSpecError, match=problem) as caught:
        check_url(url)
    assert "secret" not in str(caught.value)

def test_variables_come_from_the_job_environment() -> None:
    gate = Gate("http://localhost:${PORT}/health?app=$POST_DEPLOY_APP")
    assert gate_url(gate, {"PORT": "8080", "POST_DEPLOY_APP": "shop"}) == (
        "http://localhost:8080/health?app=shop")
    with pytest.raises(AppSpecError, match=r"uses \$PORT, which the job's environment"):
        gate_url(gate, {})
    with pytest.raises(AppSpecError, match="uses file://"):
        gate_url(Gate("$HEALTH"), {"HEALTH": "file:///etc/passwd"})

def test_appspec_scope_and_gate() -> None:
    spec = parse_appspec(appspec_yaml("true").encode(), {})
    assert (spec.scope, spec.gate) == ("app", None)
    spec = parse_appspec(appspec_yaml("true", envs={
        "POST_DEPLOY_SCOPE": "instance", "POST_DEPLOY_WAIT_URL": "http://localhost:$PORT/",
        "POST_DEPLOY_WAIT_FOR_COMMIT": "true", "POST_DEPLOY_WAIT_TIMEOUT": "60",
        "PORT": "8080"}).encode(), {})
    assert spec.scope == "instance"
    assert spec.gate == Gate("http://localhost:$PORT/", True, 60)
    assert "POST_DEPLOY_SCOPE" not in spec.env and spec.env["PORT"] == "8080"
    # The executor's environment is the fallback, as for the other POST_DEPLOY_* keys.
    spec = parse_appspec(appspec_yaml("true").encode(), {"POST_DEPLOY_SCOPE": "instance"})
    assert spec.scope == "instance"

@pytest.mark.parametrize(("envs", "problem"), [
    ({"POST_DEPLOY_SCOPE": "fleet"}, "invalid POST_DEPLOY_SCOPE: 'fleet'; use 'app'"),
    ({"POST_DEPLOY_WAIT_URL": "file:///etc/passwd"}, "uses file://"),
    ({"POST_DEPLOY_WAIT_URL": "gopher://h/"}, "uses gopher://"),
    ({"POST_DEPLOY_WAIT_URL": "http://$U:$P@localhost/"}, "carries credentials"),
    ({"POST_DEPLOY_WAIT_URL": "http://localhost/", "POST_DEPLOY_WAIT_FOR_COMMIT": "yes please"},
     "invalid POST_DEPLOY_WAIT_FOR_COMMIT"),
])
def test_appspec_refuses_what_cannot_be_meant(envs: dict[str, str], problem: str) -> None:
    with pytest.raises(AppSpecError, match=problem):
        parse_appspec(appspec_yaml("true", envs=envs).encode(), {})

def test_wait_timeout_is_validated_like_the_job_timeout() -> None:
    def warnings(value: str) -> tuple[tuple[str, ...], int]:
        spec = parse_appspec(appspec_yaml("true", envs={
            "POST_DEPLOY_WAIT_URL": "http://localhost/",
            "POST_DEPLOY_WAIT_TIMEOUT": value}).encode(), {})
        assert spec.gate is not None
        return spec.warnings, spec.gate.timeout

    assert warnings("abc") == (("invalid POST_DEPLOY_WAIT_TIMEOUT: 'abc' is not a positive "
                                "integer; using the default 300 s",), 300)
    assert warnings("0")[1] == 300
    assert warnings("")[0] == ("POST_DEPLOY_WAIT_TIMEOUT is empty; using the default 300 s",)
    assert warnings("1000000")[1] == 86_400
    assert warnings("45") == ((), 45)


def validate(tmp_path: Path, **envs: str) -> subprocess.CompletedProcess[str]:
    repo = tmp_path / "app"
    repo.mkdir(exist_ok=True)
    (repo / "appspec.yaml").write_text(appspec_yaml("echo hi", envs=envs))
    return cli(tmp_path, "validate", str(repo))


def test_validate_checks_scope_gate_and_wait_timeout(tmp_path: Path) -> None:
    good = validate(tmp_path, POST_DEPLOY_SCOPE="instance", PORT="8080",
                    POST_DEPLOY_WAIT_URL="http://localhost:${PORT}/health",
                    POST_DEPLOY_WAIT_FOR_COMMIT="true", POST_DEPLOY_WAIT_TIMEOUT="120")
    assert "ok: scope instance: once per deployment on every host" in good.stdout
    assert ("ok: waits up to 120 s until POST_DEPLOY_WAIT_URL answers 2xx with the commit"
            in good.stdout)
    assert "8080" not in good.stdout  # values are never printed

    bad_scope = validate(tmp_path, POST_DEPLOY_SCOPE="everywhere")
    assert bad_scope.returncode == 1
    assert "error: invalid POST_DEPLOY_SCOPE: 'everywhere'" in bad_scope.stdout
    for url, problem in (("file:///etc/passwd", "uses file://"),
                         ("http://u:pw@localhost/", "carries credentials")):
        bad_url = validate(tmp_path, POST_DEPLOY_WAIT_URL=url)
        assert bad_url.returncode == 1 and f"error: POST_DEPLOY_WAIT_URL {problem}" in (
            bad_url.stdout)
    slow = validate(tmp_path, POST_DEPLOY_WAIT_URL="http://localhost/",
                    POST_DEPLOY_WAIT_TIMEOUT="soon")
    assert "warning: invalid POST_DEPLOY_WAIT_TIMEOUT: 'soon'" in slow.stdout
    unset = validate(tmp_path, POST_DEPLOY_WAIT_URL="http://localhost:$APP_PORT/")
    assert "warning: POST_DEPLOY_WAIT_URL uses $APP_PORT, which the job's environment" in (
        unset.stdout)
