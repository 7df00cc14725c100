"""The `postdeploy` command line: wires flags to Settings and to the library.

Every error is one line on stderr (`postdeploy: error: ...`) and a non-zero
exit; a traceback is a bug.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, TypeVar, cast

import click
import redis
from kombu.exceptions import OperationalError

from postdeploy import __version__
from postdeploy.config import (
    DEFAULT_FLOWER_PORT,
    DEFAULT_LISTEN_ADDRESS,
    DEFAULT_METRICS_PORT,
    Settings,
)
from postdeploy.connection import address_file, connect, resolve_redis_url
from postdeploy.errors import ConfigError, PostdeployError, RedisUnavailable
from postdeploy.logconfig import configure_logging
from postdeploy.records import RunRecord
from postdeploy.redaction import redact_url
from postdeploy.state import StateStore

F = TypeVar("F", bound=Callable[..., Any])
CHECK_TIMEOUT = 30.0  # seconds `check` waits for the workers' answers
EXIT_USAGE = 2  # bad flags or configuration
EXIT_FAILED = 1  # anything else that went wrong
PORT = click.IntRange(1, 65535)
# worker and beat pass what they do not know on to Celery (`python -m worker -Q x`).
PASS_THROUGH = {"ignore_unknown_options": True, "allow_extra_args": True}


def common_options(func: F) -> F:
    """--state-dir / --config / --redis-url, accepted before or after the command name."""
    options = [
        click.option("--state-dir", type=click.Path(file_okay=False), default=None,
                     help="State directory (POSTDEPLOY_STATE_DIR, default ./.postdeploy)."),
        click.option("--config", type=click.Path(dir_okay=False), default=None,
                     help="postdeploy.yaml with 'apps:' (POSTDEPLOY_CONFIG)."),
        click.option("--redis-url", default=None,
                     help="Redis URL (POSTDEPLOY_REDIS_URL); default: the running `up`."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def with_settings(func: F) -> F:
    """Merge the command's and the group's common options into a loaded Settings."""

    def wrapper(ctx: click.Context, /, state_dir: str | None, config: str | None,
                redis_url: str | None, **kwargs: Any) -> Any:
        group = ctx.obj or {}
        overrides = {"state_dir": state_dir or group.get("state_dir"),
                     "config": config or group.get("config"),
                     "redis_url": redis_url or group.get("redis_url")}
        return func(Settings.load(overrides=overrides), **kwargs)

    # click names the command and writes its help from these.
    wrapper.__name__, wrapper.__doc__ = func.__name__, func.__doc__
    return common_options(click.pass_context(wrapper))  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="postdeploy")
@common_options
@click.pass_context
def cli(ctx: click.Context, state_dir: str | None, config: str | None,
        redis_url: str | None) -> None:
    """Run an app's POST_DEPLOY job once per deployed commit."""
    ctx.obj = {"state_dir": state_dir, "config": config, "redis_url": redis_url}


def open_store(settings: Settings) -> tuple[str, StateStore]:
    """Redis URL and a StateStore, or RedisUnavailable saying what to start."""
    url = resolve_redis_url(settings)
    try:
        client = connect(url)
    except RedisUnavailable:
        if settings.redis_url:
            raise
        raise RedisUnavailable(
            f"the `postdeploy up` that wrote {address_file(settings.state_dir)} is not "
            f"running (Redis at {redact_url(url)} does not answer); start `postdeploy up` "
            "again") from None
    return url, StateStore(client, settings.history_limit)


@cli.command()
@click.option("--repo", help="Watch one app: a git URL or path (POSTDEPLOY_REPO).")
@click.option("--branch", help="Branch to follow (POSTDEPLOY_BRANCH; default: HEAD).")
@click.option("--name", help="App name (POSTDEPLOY_APP; default: the repo's name).")
@click.option("--interval", type=click.FloatRange(min=0, min_open=True),
              help="Seconds between commit checks (POSTDEPLOY_CHECK_INTERVAL, default 30).")
@click.option("--flower", is_flag=True, help="Also run Flower (task monitor).")
@click.option("--flower-address", default=DEFAULT_LISTEN_ADDRESS, show_default=True)
@click.option("--flower-port", type=PORT, default=DEFAULT_FLOWER_PORT, show_default=True)
@click.option("--webhook-port", type=PORT, default=None,
              help="Also run the push webhook service on this port "
                   "(needs POSTDEPLOY_WEBHOOK_SECRET).")
@click.option("--webhook-address", default=DEFAULT_LISTEN_ADDRESS, show_default=True)
@common_options
@click.pass_context
def up(ctx: click.Context, repo: str | None, branch: str | None, name: str | None,
       interval: float | None, flower: bool, flower_address: str, flower_port: int,
       webhook_port: int | None, webhook_address: str,
       state_dir: str | None, config: str | None, redis_url: str | None) -> int:
    """All-in-one: Redis (embedded unless given), a worker, beat; Ctrl-C stops all."""
    from postdeploy.up import UpOptions, run_up

    group = ctx.obj or {}
    settings = Settings.load(overrides={
        "state_dir": state_dir or group.get("state_dir"),
        "config": config or group.get("config"),
        "redis_url": redis_url or group.get("redis_url"),
        "repo": repo, "branch": branch, "name": name, "check_interval": interval})
    configure_logging(settings.log_level)
    single_repo = bool(repo or settings.environ.get("POSTDEPLOY_REPO"))
    return run_up(settings, UpOptions(flower=flower, flower_address=flower_address,
                                      flower_port=flower_port, single_repo=single_repo,
                                      webhook_port=webhook_port,
                                      webhook_address=webhook_address))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Stable JSON (see README).")
@with_settings
def status(settings: Settings, as_json: bool) -> int:
    """Per app: last seen commit, latest run, its status, when, how long."""
    from postdeploy.instances import InstanceRegistry
    from postdeploy.manual import known_apps
    from postdeploy.views import AppStatus, status_json, status_table
    from postdeploy.webhook_state import last_push_times

    _, store = open_store(settings)
    registered = store.registered_apps()
    apps = known_apps(settings, store)
    pushes = last_push_times(store.client, list(apps))
    registry = InstanceRegistry(store.client)
    rows = [AppStatus(name, (app.source if app else registered.get(name, {}).get("source")),
                      store.last_seen(name), store.latest_run(name),
                      (store.check_failure(name) or {}).get("error"),
                      last_push_at=pushes[name], instances=tuple(registry.live(name)))
            for name, app in apps.items()]
    if as_json:
        click.echo(json.dumps(status_json(rows), indent=2, sort_keys=True))
    elif not rows:
        click.echo("no apps registered yet; is `postdeploy up` (or a worker) running?",
                   err=True)
    else:
        click.echo(status_table(rows))
    return 0


RAW_HELP = "Write the job's bytes as they are, even to a terminal."


def job_output_stream(raw: bool) -> BinaryIO:
    """Where job output goes: a terminal gets control characters escaped (a job's
    ESC sequences and CRs must not redraw the operator's screen), a pipe the bytes."""
    if raw or not sys.stdout.isatty():
        return sys.stdout.buffer
    from postdeploy.output import TerminalOutput
    return cast(BinaryIO, TerminalOutput(sys.stdout))


@cli.command()
@click.argument("app")
@click.option("--sha", help="Commit to run (default: the last seen commit).")
@click.option("--host", help="Run on this host's instance only (see `status`).")
@click.option("--all-instances", is_flag=True, help="Run once on every live instance.")
@click.option("--wait", is_flag=True, help="Follow the output; exit 0 only on success.")
@click.option("--raw", is_flag=True, help=RAW_HELP)
@with_settings
def run(settings: Settings, app: str, sha: str | None, host: str | None, all_instances: bool,
        wait: bool, raw: bool) -> int:
    """Re-run APP's job by hand (trigger `manual`)."""
    from postdeploy.instances import InstanceRegistry
    from postdeploy.manual import (
        known_apps,
        pick_commit,
        pick_targets,
        queue_manual_run,
        require_app,
    )

    if host is not None and all_instances:
        raise click.UsageError("give --host or --all-instances, not both")
    url, store = open_store(settings)
    apps = known_apps(settings, store)
    require_app(apps, app)
    instances = InstanceRegistry(store.client).live(app)
    config = apps[app]
    if sha is None and (host or all_instances) and config is not None and config.path:
        # A path app's commit is per host: by default, what each chosen host has.
        targets = pick_targets(config, app, None, instances, host, all_instances)
    else:
        commit = pick_commit(settings, store, config, app, sha)
        targets = pick_targets(config, app, commit, instances, host, all_instances)
    records = [queue_manual_run(settings, url, store, app, target_sha, target_host)
               for target_host, target_sha in targets]
    for record in records:
        where = f" on {record.host}" if record.host else ""
        click.echo(f"queued manual run {record.id} of {app}@{record.sha[:7]}{where}", err=wait)
    if not wait:
        return 0
    failed = [final for record in records
              if (final := _follow(store, app, record.id, raw)).status != "succeeded"]
    if not failed:
        click.echo(f"run{'s' if len(records) > 1 else ''} "
                   f"{', '.join(r.id for r in records)} succeeded", err=True)
        return 0
    final = failed[0]
    # The reason already names the exit code ("exited with code 3"); say it once.
    reason = final.reason or (f"exit code {final.exit_code}" if final.exit_code is not None
                              else "no reason recorded")
    where = f" on {final.host}" if final.host else ""
    raise PostdeployError(f"run {final.id}{where} {final.status}: {reason}")


def _follow(store: StateStore, app: str, run_id: str, raw: bool) -> RunRecord:
    from postdeploy.follow import follow_run

    try:
        return follow_run(store, run_id, job_output_stream(raw),
                          lambda line: click.echo(line, err=True))
    except KeyboardInterrupt:
        click.echo(f"\nstopped following; run {run_id} goes on "
                   f"(`postdeploy logs {app} {run_id}`)", err=True)
        raise SystemExit(130) from None


@cli.command()
@click.argument("app")
@click.argument("run_id", required=False)
@click.option("--raw", is_flag=True, help=RAW_HELP)
@with_settings
def logs(settings: Settings, app: str, run_id: str | None, raw: bool) -> int:
    """Stored output of APP's latest run (or RUN_ID)."""
    from postdeploy.manual import known_apps, require_app

    _, store = open_store(settings)
    require_app(known_apps(settings, store), app)
    record = store.get_run(run_id) if run_id else store.latest_run(app)
    if record is None or record.app != app:
        if run_id:
            raise PostdeployError(f"no run {run_id!r} of {app!r}; "
                                  f"see `postdeploy history {app}`")
        raise PostdeployError(f"{app!r} has no runs yet; see `postdeploy status`")
    tail, total = store.read_output(record.id)
    click.echo(f"run {record.id} of {app}@{record.sha[:7]} ({record.trigger}): "
               f"{record.status}", err=True)
    if total > len(tail):
        click.echo(f"... {total - len(tail)} earlier bytes not kept ...")
    out = job_output_stream(raw)
    out.write(tail)
    out.flush()
    return 0


@cli.command()
@click.argument("app")
@click.option("--json", "as_json", is_flag=True, help="Stable JSON (see README).")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
@with_settings
def history(settings: Settings, app: str, as_json: bool, limit: int) -> int:
    """APP's runs, newest first."""
    from postdeploy.manual import known_apps, require_app
    from postdeploy.views import history_json, history_table

    _, store = open_store(settings)
    require_app(known_apps(settings, store), app)
    runs = store.history(app, limit)
    if as_json:
        click.echo(json.dumps(history_json(app, runs), indent=2, sort_keys=True))
    elif not runs:
        click.echo(f"{app} has no runs yet", err=True)
    else:
        click.echo(history_table(runs))
    return 0


@cli.command()
@click.argument("app")
@click.argument("run_id", required=False)
@with_settings
def cancel(settings: Settings, app: str, run_id: str | None) -> int:
    """Cancel APP's running, waiting or queued run (or RUN_ID); exit 1 if there is none."""
    from postdeploy.cancel import NotThatAppsRun, cancel_and_report, pick_run
    from postdeploy.errors import UnknownApp
    from postdeploy.manual import known_apps, require_app

    _, store = open_store(settings)
    try:
        require_app(known_apps(settings, store), app)
        record = pick_run(store, app, run_id)
    except (UnknownApp, NotThatAppsRun) as exc:
        return fail(str(exc), EXIT_USAGE)
    if record is None:
        click.echo(f"nothing to cancel: {app} has no queued, waiting or running run")
        return EXIT_FAILED
    done = cancel_and_report(settings, store, record,
                             lambda line, to_stderr: click.echo(line, err=to_stderr))
    return 0 if done else EXIT_FAILED


@cli.command()
@click.argument("app", required=False)
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True),
              default=CHECK_TIMEOUT, show_default=True, help="Seconds to wait for workers.")
@with_settings
def check(settings: Settings, app: str | None, timeout: float) -> int:
    """Check commits now (all apps, or APP) instead of waiting for the interval."""
    from postdeploy.manual import check_now, known_apps, require_app

    url, store = open_store(settings)
    apps = known_apps(settings, store)
    if app:
        require_app(apps, app)
    names = [app] if app else list(apps)
    if not names:
        raise PostdeployError("no apps registered yet; start `postdeploy up` first")
    ok = True
    for line, good in check_now(settings, url, names, timeout):
        click.echo(line)
        ok = ok and good
    return 0 if ok else EXIT_FAILED


@cli.command()
@click.option("--address", default="127.0.0.1", show_default=True,
              help="Address to listen on (loopback: put a TLS proxy in front).")
@click.option("--port", type=click.IntRange(1, 65535), default=9810, show_default=True)
@with_settings
def webhook(settings: Settings, address: str, port: int) -> int:
    """Receive signed push webhooks (GitHub, GitLab, Gitea, generic); check those apps now."""
    from postdeploy.webhook import check_settings, serve

    check_settings(settings)  # refuse before anything else: no secret, no service
    configure_logging(settings.log_level)
    return serve(settings, address, port)


@cli.command()
@click.argument("directory", required=False, default=".",
                type=click.Path(file_okay=False, path_type=Path))
def validate(directory: Path) -> int:
    """Lint an app repo's appspec.yaml, folder, command and script."""
    from postdeploy.validate import has_errors, validate_app_dir

    findings = validate_app_dir(directory)
    for finding in findings:
        click.echo(str(finding))
    errors = sum(1 for f in findings if f.level == "error")
    warnings = sum(1 for f in findings if f.level == "warning")
    click.echo(f"{directory}: {errors} error(s), {warnings} warning(s)")
    return EXIT_FAILED if has_errors(findings) else 0


@contextmanager
def celery_flags(role: str) -> Iterator[None]:
    """Celery's own usage errors (flags we passed on) as one line pointing at its help."""
    try:
        yield
    except click.UsageError as exc:
        raise ConfigError(f"{exc.format_message().rstrip('.')} (flags postdeploy does not know "
                          f"go to Celery; see `celery {role} --help`)") from None


@cli.command(context_settings=PASS_THROUGH)
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
@with_settings
def worker(settings: Settings, celery_args: tuple[str, ...]) -> int:
    """A Celery worker running jobs and checks (what `python -m worker` starts)."""
    from postdeploy.service import run_worker

    with celery_flags("worker"):
        run_worker(settings, celery_args)
    return 0


@cli.command(context_settings=PASS_THROUGH)
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
@with_settings
def beat(settings: Settings, celery_args: tuple[str, ...]) -> int:
    """Celery beat, sending the commit check every interval (`python -m beat`); run one."""
    from postdeploy.service import run_beat

    with celery_flags("beat"):
        run_beat(settings, celery_args)
    return 0


@cli.command()
@click.option("--address", default=DEFAULT_LISTEN_ADDRESS, show_default=True,
              help="Address to listen on; other than loopback needs FLOWER_BASIC_AUTH.")
@click.option("--port", type=PORT, default=DEFAULT_FLOWER_PORT, show_default=True)
@with_settings
def flower(settings: Settings, address: str, port: int) -> int:
    """Flower (task monitor) on postdeploy's tasks, auth from FLOWER_BASIC_AUTH."""
    from postdeploy.flower import run_flower

    run_flower(settings, address, port)
    return 0


@cli.command()
@click.option("--address", default=DEFAULT_LISTEN_ADDRESS, show_default=True,
              help="Address to listen on.")
@click.option("--port", type=PORT, default=DEFAULT_METRICS_PORT, show_default=True)
@with_settings
def metrics(settings: Settings, address: str, port: int) -> int:
    """Serve Prometheus metrics at /metrics, read from Redis on each scrape."""
    from postdeploy.metrics import run_metrics

    run_metrics(settings, address, port)
    return 0


@cli.command()
@click.argument("app", required=False)
@click.option("--test", "send_test", is_flag=True,
              help="Send a test message to each URL and say whether it arrived.")
@with_settings
def notify(settings: Settings, app: str | None, send_test: bool) -> int:
    """Try the notification URLs (POSTDEPLOY_NOTIFY, and APP's `notify:`; all without APP)."""
    from postdeploy.notify import destinations
    from postdeploy.notify import send_test as send_test_message

    if not send_test:
        raise click.UsageError("nothing to do; use `postdeploy notify --test [APP]`")
    if app is not None and settings.app(app) is None:
        names = ", ".join(a.name for a in settings.apps) or "none"
        raise ConfigError(f"unknown app {app!r}; apps in this configuration: {names}")
    if not destinations(settings, app):
        raise ConfigError("no notification URLs configured; set POSTDEPLOY_NOTIFY or give "
                          "the app `notify:` in postdeploy.yaml")
    results = send_test_message(settings, app)
    for result in results:
        click.echo(f"ok      {result.shown}" if result.ok else
                   f"FAILED  {result.shown}: {result.error}")
    return 0 if all(r.ok for r in results) else EXIT_FAILED


def fail(message: str, code: int) -> int:
    """Print the one error line; return the exit code."""
    line = " ".join(redact_url(message).split())
    click.echo(f"postdeploy: error: {line}", err=True)
    return code


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the command, turn every error into one line."""
    args = sys.argv[1:] if argv is None else argv
    try:
        # A bare `postdeploy` shows the help, not a one-line usage error.
        result = cli.main(args=args or ["--help"], prog_name="postdeploy",
                          standalone_mode=False)
        code = result if isinstance(result, int) else 0
    except click.exceptions.Abort:
        code = fail("interrupted", 130)
    except click.UsageError as exc:
        hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else ""
        code = fail(exc.format_message().rstrip(".") + hint, EXIT_USAGE)
    except click.ClickException as exc:
        code = fail(exc.format_message(), exc.exit_code or EXIT_FAILED)
    except ConfigError as exc:
        code = fail(str(exc), EXIT_USAGE)
    except PostdeployError as exc:
        code = fail(str(exc), EXIT_FAILED)
    except (redis.RedisError, OperationalError) as exc:
        code = fail(f"Redis error: {exc}; is Redis (or `postdeploy up`) running?", EXIT_FAILED)
    except KeyboardInterrupt:
        code = fail("interrupted", 130)
    except BrokenPipeError:
        # Output piped into `head` and the like: the reader left, nothing to report.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = EXIT_FAILED
    except Exception as exc:  # a bug: still one line, with what to report
        code = fail(f"unexpected {type(exc).__name__}: {exc}; please report this", EXIT_FAILED)
    sys.exit(code)


if __name__ == "__main__":
    main()
