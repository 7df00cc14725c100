"""`postdeploy up`: the all-in-one local mode.

Redis (embedded unless a URL is given), a worker, beat and optionally Flower,
all in the foreground as children of one supervisor. Settings reach the
children through POSTDEPLOY_* variables, so they load exactly what we checked.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import secrets
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from postdeploy.config.checks import make_state_dir
from postdeploy.config.notify import mask_url
from postdeploy.config.redaction import redact_url
from postdeploy.config.settings import DEFAULT_FLOWER_PORT, DEFAULT_LISTEN_ADDRESS, Settings
from postdeploy.errors import ConfigError
from postdeploy.run.processes import die_with_parent
from postdeploy.run.sandbox import check_job_user_setting
from postdeploy.run.user import check_app_users
from postdeploy.services.embedded_redis import EmbeddedRedis
from postdeploy.services.supervisor import ChildDied, Supervisor
from postdeploy.store.connection import address_file, connect, redis_client
from postdeploy.store.records import Status
from postdeploy.store.state import StateStore

LOCK_FILE = "up.lock"  # in the state dir: one `up` per state dir
FLOWER_MODULE = "postdeploy.services.flower"
WEBHOOK_SECRET_VAR = "POSTDEPLOY_WEBHOOK_SECRET"
DEFAULT_WEBHOOK_ADDRESS = DEFAULT_LISTEN_ADDRESS  # a TLS proxy in front brings pushes here


@dataclass(frozen=True)
class UpOptions:
    """What `up` starts besides the worker and beat."""

    flower: bool = False
    single_repo: bool = False  # the app came from --repo / POSTDEPLOY_REPO, not a config file
    flower_address: str = DEFAULT_LISTEN_ADDRESS
    flower_port: int = DEFAULT_FLOWER_PORT
    webhook_port: int | None = None  # None: no webhook service
    webhook_address: str = DEFAULT_WEBHOOK_ADDRESS


def run_up(settings: Settings, options: UpOptions) -> int:
    """Run everything until SIGINT/SIGTERM (exit 0) or until a child dies (exit 1)."""
    if not settings.apps:
        raise ConfigError("no apps to watch; pass --repo PATH_OR_URL, or --config with "
                          "'apps:' (or set POSTDEPLOY_REPO / POSTDEPLOY_CONFIG)")
    if options.flower and importlib.util.find_spec(FLOWER_MODULE) is None:
        raise ConfigError(f"--flower needs the {FLOWER_MODULE} module, which this "
                          "installation lacks; run without --flower")
    if options.webhook_port is not None:
        from postdeploy.webhook.service import check_settings
        check_settings(settings)  # no secret: refuse now, not after starting everything
    # Who each app's job runs as: refused now in one line, not by a worker that died.
    check_job_user_setting(settings)
    check_app_users(settings)
    make_state_dir(settings.state_dir)
    with _exclusive(settings.state_dir):
        embedded: EmbeddedRedis | None = None
        if settings.redis_url:
            url = settings.redis_url
            connect(url).close()  # a wrong URL is one clear line now, not a retry loop later
        else:
            embedded = EmbeddedRedis(settings.state_dir, preexec_fn=die_with_parent)
            url = embedded.start()
        supervisor = Supervisor(secrets.token_hex(12), keep=_app_daemons(url))
        try:
            _write_address(settings.state_dir, url)
            _banner(supervisor, settings, url, embedded, options)
            env = child_env(settings, url, options.single_repo)
            webhook_env = dict(env)
            # Only the webhook service needs the webhook secret; the processes that run
            # jobs (and Flower, which can start them) never get it.
            env.pop(WEBHOOK_SECRET_VAR, None)
            python = sys.executable
            supervisor.start("worker", [python, "-m", "worker"], env)
            supervisor.start("beat", [python, "-m", "beat"], env)
            if options.flower:
                supervisor.start("flower", [python, "-m", "postdeploy.cli", "flower",
                                            "--address", options.flower_address,
                                            "--port", str(options.flower_port)], env)
            if options.webhook_port is not None:
                supervisor.start("webhook", [python, "-m", "postdeploy.cli", "webhook",
                                             "--address", options.webhook_address,
                                             "--port", str(options.webhook_port)],
                                 webhook_env)
            supervisor.stream()

            def redis_alive() -> str | None:
                if embedded is None or embedded.alive():
                    return None
                return f"embedded Redis (see {embedded.log_path})"

            try:
                supervisor.watch(redis_alive)
                supervisor.say("postdeploy up: stopping...")
                return 0
            except ChildDied as exc:
                print(f"postdeploy: error: {exc}", file=sys.stderr, flush=True)
                return 1
        finally:
            supervisor.stop()
            if embedded is not None:
                embedded.stop()
            _remove_address(settings.state_dir, url)
            supervisor.say("postdeploy up: stopped")


def _app_daemons(url: str) -> Callable[[str], bool]:
    """Run id -> True when its job ended by itself (succeeded or failed): whatever it left
    running is the app's (the guide's `pm2 start`), so stopping `up` leaves it alone.
    A job still running, timed out or cancelled is stopped with everything else."""
    def keep(run_id: str) -> bool:
        record = StateStore(redis_client(url)).get_run(run_id)
        return record is not None and record.status in (Status.SUCCEEDED, Status.FAILED)
    return keep


def child_env(settings: Settings, url: str, single_repo: bool) -> dict[str, str]:
    """The environment of worker, beat and Flower: ours plus the checked settings."""
    env = dict(settings.environ)
    for name in ("POSTDEPLOY_REPO", "POSTDEPLOY_BRANCH", "POSTDEPLOY_APP", "POSTDEPLOY_CONFIG"):
        env.pop(name, None)
    env.update({"POSTDEPLOY_REDIS_URL": url,
                "POSTDEPLOY_STATE_DIR": str(settings.state_dir),
                "POSTDEPLOY_CHECK_INTERVAL": repr(settings.check_interval)})
    if settings.config_file is not None:
        env["POSTDEPLOY_CONFIG"] = str(settings.config_file)
    if single_repo:
        # One app from --repo / POSTDEPLOY_REPO: it overrides any config file's apps.
        app = settings.apps[0]
        env.update({"POSTDEPLOY_REPO": app.repo or "", "POSTDEPLOY_APP": app.name})
        if app.branch:
            env["POSTDEPLOY_BRANCH"] = app.branch
    return env


def _banner(supervisor: Supervisor, settings: Settings, url: str,
            embedded: EmbeddedRedis | None, options: UpOptions) -> None:
    where = f"embedded, data in {embedded.data_dir}" if embedded else "external"
    lines = [f"postdeploy up: watching {len(settings.apps)} app(s), "
             f"checking every {settings.check_interval:g} s"]
    for app in settings.apps:
        branch = f" (branch {app.branch})" if app.branch else ""
        lines.append(f"  app     {app.name}: {app.source}{branch}")
    lines.append(f"  redis   {redact_url(url)} ({where})")
    notify = dict.fromkeys([*settings.notify, *(u for a in settings.apps for u in a.notify)])
    if notify:  # notify URLs carry tokens: shown masked
        lines.append(f"  notify  {', '.join(mask_url(u) for u in notify)} "
                     f"(on {', '.join(sorted(settings.notify_on))})")
    if options.flower:
        lines.append(f"  flower  http://{options.flower_address}:{options.flower_port}/")
    if options.webhook_port is not None:
        lines.append(f"  webhook http://{options.webhook_address}:{options.webhook_port}"
                     "/hooks/{github,gitlab,gitea,generic}")
    lines.append(f"  state   {settings.state_dir}")
    lines.append("Press Ctrl-C to stop.")
    supervisor.say("\n".join(lines))


@contextmanager
def _exclusive(state_dir: Path) -> Iterator[None]:
    """Hold the state dir's lock: two `up`s on one dir would share one Redis data dir."""
    with open(state_dir / LOCK_FILE, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"another `postdeploy up` is already running with state dir "
                              f"{state_dir}; stop it first or pass another --state-dir") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_address(state_dir: Path, url: str) -> None:
    """Leave the URL for the other commands; it holds the password, so owner-only."""
    path = address_file(state_dir)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(url + "\n")
    os.replace(tmp, path)


def _remove_address(state_dir: Path, url: str) -> None:
    path = address_file(state_dir)
    try:
        if path.read_text().strip() == url:
            path.unlink()
    except OSError:
        pass
