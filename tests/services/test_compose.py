"""compose.yaml, Dockerfile and .env.example: their settings, and each service's command
(taken from compose.yaml, with compose's environment) run here against a real Redis.

No Docker engine is needed: the files are checked by construction, and the
commands they hold are what runs.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from postdeploy.config.settings import DEFAULT_KILL_GRACE, Settings
from postdeploy.source.appspec import DEFAULT_TIMEOUT
from tests.support.core import (
    REPO_ROOT,
    GitRemote,
    Service,
    appspec_yaml,
    finished_runs,
    free_port,
    wait_for,
)
from tests.support.webhook_client import post, signed

COMPOSE = yaml.safe_load((REPO_ROOT / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]
DOCKERFILE = (REPO_ROOT / "Dockerfile").read_text()
_VARIABLE = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
                       r"(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def env_example() -> dict[str, str]:
    values: dict[str, str] = {}
    for line in (REPO_ROOT / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def interpolate(value: Any, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error} and $$, as `docker compose` does."""
    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name"), match.group("op"), match.group("arg")
        current = env.get(name)
        unset = current is None or (current == "" and op is not None and op.startswith(":"))
        if op and op.endswith("-") and unset:
            return str(arg)
        if op and op.endswith("?") and unset:
            raise ValueError(f"{name}: {arg}")
        return current or ""
    return _VARIABLE.sub(replace, str(value))


def grace_seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)(ms|s|m|h)", value))


def compose_variables() -> set[str]:
    text = (REPO_ROOT / "compose.yaml").read_text()
    return {m.group("name") for m in _VARIABLE.finditer(text) if m.group("name")}


# -- compose.yaml -------------------------------------------------------------

def test_compose_has_the_services_from_one_image() -> None:
    assert {"redis", "worker", "beat", "flower"} <= set(SERVICES)
    ours = [name for name in SERVICES if name != "redis"]
    assert len({SERVICES[name]["image"] for name in ours}) == 1
    for name in ours:
        service = SERVICES[name]
        assert isinstance(service["command"], list), f"{name}: exec form"
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    assert SERVICES["worker"]["command"] == ["python", "-m", "worker"]
    assert SERVICES["beat"]["command"] == ["python", "-m", "beat"]
    assert SERVICES["flower"]["command"][:2] == ["postdeploy", "flower"]


def test_compose_redis_is_persistent_noeviction_and_healthchecked() -> None:
    redis_service = SERVICES["redis"]
    assert redis_service["image"].startswith("redis:7")
    command = " ".join(redis_service["command"])
    assert "--appendonly yes" in command
    assert "--maxmemory-policy noeviction" in command
    assert redis_service["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    volume = redis_service["volumes"][0].split(":")
    assert volume[1] == "/data" and volume[0] in COMPOSE["volumes"]
    assert "ports" not in redis_service  # reachable on the compose network only


def test_compose_scales_workers_and_runs_one_beat() -> None:
    worker, beat = SERVICES["worker"], SERVICES["beat"]
    assert worker["deploy"]["replicas"] >= 2
    assert "container_name" not in worker  # a fixed name would forbid scaling
    assert beat["deploy"]["replicas"] == 1
    grace = grace_seconds(interpolate(worker["stop_grace_period"], {}))
    # A stopping worker lets a default-timeout job finish, grace of a timeout included.
    assert grace > DEFAULT_KILL_GRACE
    assert grace >= DEFAULT_TIMEOUT + DEFAULT_KILL_GRACE


def test_compose_flower_needs_auth_keeps_state_and_stays_on_localhost() -> None:
    flower = SERVICES["flower"]
    for port in flower["ports"]:
        assert port.startswith("127.0.0.1:")
    assert "FLOWER_BASIC_AUTH" in flower["environment"]
    with pytest.raises(ValueError, match="FLOWER_BASIC_AUTH"):
        interpolate(flower["environment"]["FLOWER_BASIC_AUTH"], {})
    state = "/var/lib/postdeploy"  # the image's state dir
    assert any(v.split(":")[1] == state for v in flower["volumes"])
    assert f"POSTDEPLOY_STATE_DIR={state}" in DOCKERFILE
    metrics = SERVICES["metrics"]
    assert metrics["profiles"] == ["metrics"]
    assert all(port.startswith("127.0.0.1:") for port in metrics["ports"])


def test_compose_webhook_is_optional_signed_and_stays_on_localhost() -> None:
    webhook = SERVICES["webhook"]
    assert webhook["profiles"] == ["webhook"]
    assert webhook["command"][:2] == ["postdeploy", "webhook"]
    assert all(port.startswith("127.0.0.1:") for port in webhook["ports"])
    assert [p.rsplit(":", 1)[1] for p in webhook["ports"]] == [
        webhook["command"][webhook["command"].index("--port") + 1]]
    # The secret reaches the webhook service only, not the workers that run jobs.
    assert "POSTDEPLOY_WEBHOOK_SECRET" in webhook["environment"]
    assert "POSTDEPLOY_WEBHOOK_SECRET" not in SERVICES["worker"]["environment"]
    # Unset, it must not break `docker compose up` of the other services.
    assert interpolate(webhook["environment"]["POSTDEPLOY_WEBHOOK_SECRET"], {}) == ""
    assert "/healthz" in " ".join(webhook["healthcheck"]["test"])


def test_compose_worker_is_root_only_to_run_jobs_as_the_job_user() -> None:
    worker = SERVICES["worker"]
    assert worker["user"] == "0:0"
    job_user = interpolate(worker["environment"]["POSTDEPLOY_JOB_USER"], {})
    assert job_user == "postdeploy-job" == env_example()["POSTDEPLOY_JOB_USER"]
    # The image has that user, unprivileged, with a fixed uid and a home of its own.
    made = re.search(r"useradd --uid (\d+) --gid (\S+) --create-home [^\n]*\\\n\s*"
                     + re.escape(job_user) + r"\b", DOCKERFILE)
    assert made and made.group(2) == job_user, "the job user in the Dockerfile"
    uid = int(made.group(1))
    assert uid not in (0, 10001) and f"groupadd --gid {uid} {job_user}" in DOCKERFILE
    # Every other service keeps the image's user, and never gets the job user setting.
    for name, service in SERVICES.items():
        if name not in ("worker", "redis"):
            assert "user" not in service, name
            assert "POSTDEPLOY_JOB_USER" not in service["environment"], name
    # The mount namespace's capability is a documented choice, off by default.
    assert "SYS_ADMIN" not in worker.get("cap_add", [])
    text = (REPO_ROOT / "compose.yaml").read_text()
    assert "# cap_add: [SYS_ADMIN]" in text


def test_env_example_documents_every_compose_variable() -> None:
    example = env_example()
    assert example["POSTDEPLOY_REDIS_URL"] == "redis://redis:6379/0"
    text = (REPO_ROOT / ".env.example").read_text()
    documented = set(re.findall(r"^#? ?([A-Z][A-Z0-9_]*)=", text, flags=re.M))
    missing = compose_variables() - documented
    assert not missing, f"not in .env.example: {sorted(missing)}"
    for name in ("POSTDEPLOY_REPO", "POSTDEPLOY_CHECK_INTERVAL", "FLOWER_BASIC_AUTH",
                 "POSTDEPLOY_WEBHOOK_SECRET"):
        assert example.get(name), name


# -- Dockerfile -----------------------------------------------------------------

def test_dockerfile_is_multi_stage_non_root_with_init_and_git() -> None:
    stages = re.split(r"^FROM ", DOCKERFILE, flags=re.M)[1:]
    assert len(stages) == 2 and stages[0].split()[2] == "builder"
    builder, final = stages
    assert "build-essential" in builder and "build-essential" not in final
    assert "--from=builder" in final
    install = re.search(r"apt-get install[^\n]*", final)
    assert install and "git" in install.group(0).split() and "tini" in install.group(0)
    user = re.findall(r"^USER (\S+)", final, flags=re.M)
    assert user and user[-1].split(":")[0] not in ("root", "0")
    # Services other than the worker run as the image's user: 10001, not the job user.
    assert user[-1] == "10001:10001"
    assert "useradd --uid 10001 " in final
    assert re.search(r"^STOPSIGNAL SIGTERM$", final, flags=re.M)
    entrypoint = re.search(r"^ENTRYPOINT (.+)$", final, flags=re.M)
    cmd = re.search(r"^CMD (.+)$", final, flags=re.M)
    assert entrypoint and cmd
    assert json.loads(entrypoint.group(1))[0].endswith("tini")  # exec form, init first
    assert json.loads(cmd.group(1)) == SERVICES["worker"]["command"]
    ignored = (REPO_ROOT / ".dockerignore").read_text().split()
    assert {".git", ".env", ".venv"} <= set(ignored)


# -- the commands, run ------------------------------------------------------------

def service_process(name: str, variables: dict[str, str], state_dir: Path,
                    log_dir: Path, port: int | None = None) -> Service:
    """compose.yaml's command and environment for ``name``, as a local process.

    Only what the image provides is added (its ENV state dir, here a temp dir);
    a published port is swapped for a free one so tests can run side by side.
    """
    service = SERVICES[name]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("POSTDEPLOY_", "FLOWER_"))}
    env.update({k: interpolate(v, variables) for k, v in service["environment"].items()})
    env.update({"POSTDEPLOY_STATE_DIR": str(state_dir), "PYTHONUNBUFFERED": "1"})
    if "POSTDEPLOY_JOB_USER" in env:
        # The image's job user does not exist on this host; a job user is only
        # allowed when the executor is root (the image's worker is).
        if os.geteuid() == 0:
            env["POSTDEPLOY_JOB_USER"] = "nobody"
        else:
            del env["POSTDEPLOY_JOB_USER"]
    command = [interpolate(part, variables) for part in service["command"]]
    # The image's two entry points: `python -m worker|beat` and the `postdeploy` command.
    assert command[0] in ("python", "postdeploy")
    if command[0] == "postdeploy":
        command = ["python", "-m", "postdeploy.cli", *command[1:]]
    if port is not None:
        command[command.index("--port") + 1] = str(port)
    return Service(command[1:], env, log_dir / f"{name}.log")


def http_status(url: str, auth: str | None = None) -> int | None:
    headers = {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()} \
        if auth else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                    timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, ConnectionError):
        return None


def test_compose_commands_run_the_service(redis_url: str, rclient: redis.Redis,
                                          remote: GitRemote, tmp_path: Path) -> None:
    sha = remote.commit({"appspec.yaml": appspec_yaml("echo migrated $COMMIT_SHA")})
    variables = {**env_example(), "POSTDEPLOY_REDIS_URL": redis_url,
                 "POSTDEPLOY_REPO": remote.url, "POSTDEPLOY_APP": "shop",
                 "POSTDEPLOY_CHECK_INTERVAL": "60", "FLOWER_BASIC_AUTH": "ops:pw",
                 "POSTDEPLOY_WEBHOOK_SECRET": "compose-secret"}
    flower_port, metrics_port, webhook_port = free_port(), free_port(), free_port()
    started: list[Service] = []
    try:
        for name, port in (("flower", flower_port), ("metrics", metrics_port),
                           ("webhook", webhook_port), ("worker", None), ("beat", None)):
            started.append(service_process(name, variables, tmp_path / f"state-{name}",
                                           tmp_path, port))
        flower, metrics, webhook, worker, beat = started
        # beat checks at start-up, the worker runs the job of the current commit.
        run = wait_for(lambda: next(iter(finished_runs(rclient, "shop")), None), 60,
                       what="the job run by the compose worker")
        assert (run.sha, run.trigger, run.status) == (sha, "auto", "succeeded"), \
            worker.log() + beat.log()
        assert "checking 1 app(s)" in beat.log()
        base = f"http://127.0.0.1:{flower_port}"
        wait_for(lambda: http_status(f"{base}/healthcheck") == 200, 30, what="Flower")
        assert http_status(f"{base}/api/workers") == 401
        assert http_status(f"{base}/api/workers", auth="ops:pw") == 200
        scrape = f"http://127.0.0.1:{metrics_port}/metrics"
        wait_for(lambda: http_status(scrape) == 200, 30, what="the metrics endpoint")
        # A signed push runs the next commit long before the 60 s check would.
        wait_for(lambda: http_status(f"http://127.0.0.1:{webhook_port}/healthz") == 200, 30,
                 what="the webhook service")
        pushed = remote.commit({"appspec.yaml": appspec_yaml("echo migrated $COMMIT_SHA"),
                                "v": "2"})
        body, headers = signed("generic", "compose-secret",
                               {"repository": remote.url, "ref": "refs/heads/main"})
        assert post(webhook_port, "/hooks/generic", body, headers).body["apps"] == ["shop"]
        second = wait_for(lambda: [r for r in finished_runs(rclient, "shop") if r.sha == pushed],
                          30, what="the pushed commit's run")[0]
        assert second.status == "succeeded", webhook.log() + worker.log()
    finally:
        for service in reversed(started):
            service.stop(signal.SIGTERM)
    # SIGTERM (the image's STOPSIGNAL) is a clean stop for every service.
    for service in started:
        assert service.proc.returncode == 0, service.log()[-2000:]


def test_compose_webhook_refuses_to_start_without_its_secret(redis_url: str,
                                                             tmp_path: Path) -> None:
    variables = {**env_example(), "POSTDEPLOY_REDIS_URL": redis_url,
                 "POSTDEPLOY_WEBHOOK_SECRET": ""}
    service = service_process("webhook", variables, tmp_path / "state", tmp_path, free_port())
    try:
        code = service.proc.wait(60)
    finally:
        service.stop()
    assert code == 2
    (line,) = service.log().strip().splitlines()
    assert line.startswith("postdeploy: error: POSTDEPLOY_WEBHOOK_SECRET is not set")


def test_compose_command_starts_without_optional_settings(tmp_path: Path) -> None:
    """Empty ${VAR:-} values are 'not set' for postdeploy, not wrong values."""
    variables = {"FLOWER_BASIC_AUTH": "ops:pw", "POSTDEPLOY_REPO": "/srv/shop.git"}
    env = {k: interpolate(v, variables)
           for k, v in SERVICES["worker"]["environment"].items()}
    settings = Settings.load({**env, "POSTDEPLOY_STATE_DIR": str(tmp_path)})
    assert settings.redis_url == "redis://redis:6379/0"
    assert [a.name for a in settings.apps] == ["shop"] and settings.apps[0].branch is None
    assert settings.check_interval == 30 and settings.concurrency == 2
