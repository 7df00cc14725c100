"""The operator's commands: what ran (status, logs, history), run or cancel a job,
check commits now, try the notifications, and lint an app repo (validate)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import BinaryIO, cast

import click

from postdeploy.cli.group import EXIT_FAILED, EXIT_USAGE, cli, fail, open_store, with_settings
from postdeploy.config.settings import Settings
from postdeploy.errors import ConfigError, PostdeployError
from postdeploy.store.records import RunRecord
from postdeploy.store.state import StateStore

CHECK_TIMEOUT = 30.0  # seconds `check` waits for the workers' answers


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Stable JSON (see docs/commands.md).")
@with_settings
def status(settings: Settings, as_json: bool) -> int:
    """Per app: last seen commit, latest run, its status, when, how long."""
    from postdeploy.cli.views import AppStatus, status_json, status_table
    from postdeploy.store.instances import InstanceRegistry
    from postdeploy.store.verdict import judge
    from postdeploy.trigger.manual import known_apps
    from postdeploy.webhook.state import last_push_times

    _, store = open_store(settings)
    registered = store.registered_apps()
    apps = known_apps(settings, store)
    pushes = last_push_times(store.client, list(apps))
    registry = InstanceRegistry(store.client)
    rows = [AppStatus(name, (app.source if app else registered.get(name, {}).get("source")),
                      store.last_seen(name), store.latest_run(name),
                      (store.check_failure(name) or {}).get("error"),
                      last_push_at=pushes[name], instances=tuple(registry.live(name)),
                      deployment=store.deployments.current(name),
                      verdict=judge(store, name))
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
    from postdeploy.run.output import TerminalOutput
    return cast(BinaryIO, TerminalOutput(sys.stdout))


@cli.command()
@click.argument("app")
@click.option("--sha", help="Commit to run (default: the last seen commit).")
@click.option("--host", help="Run on this host's instance only (see `status`).")
@click.option("--all-instances", is_flag=True, help="Run once on every live instance.")
@click.option("--failed-hosts", is_flag=True,
              help="Run again only on the hosts where the current deployment's job failed.")
@click.option("--wait", is_flag=True, help="Follow the output; exit 0 only on success.")
@click.option("--raw", is_flag=True, help=RAW_HELP)
@with_settings
def run(settings: Settings, app: str, sha: str | None, host: str | None, all_instances: bool,
        failed_hosts: bool, wait: bool, raw: bool) -> int:
    """Re-run APP's job by hand (trigger `manual`)."""
    from postdeploy.store.instances import InstanceRegistry
    from postdeploy.trigger.manual import (
        known_apps,
        pick_commit,
        pick_targets,
        queue_manual_run,
        require_app,
    )

    if sum((host is not None, all_instances, failed_hosts)) > 1:
        raise click.UsageError("give one of --host, --all-instances and --failed-hosts")
    if failed_hosts and sha is not None:
        raise click.UsageError("--failed-hosts runs the failed hosts' own commit; leave out --sha")
    url, store = open_store(settings)
    apps = known_apps(settings, store)
    require_app(apps, app)
    instances = InstanceRegistry(store.client).live(app)
    config = apps[app]
    if failed_hosts:
        targets = _failed_targets(store, app)
    elif sha is None and (host or all_instances) and config is not None and config.path:
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
    raise PostdeployError(_failure_line(failed[0]))


def _failed_targets(store: StateStore, app: str) -> list[tuple[str | None, str]]:
    """(host, commit) of each run that failed in the app's current deployment."""
    from postdeploy.store.verdict import judge

    verdict = judge(store, app)
    failed = [r for r in verdict.runs if r.host in verdict.failed_hosts]
    if not failed:
        raise PostdeployError(f"no failed hosts to run again: {verdict.text}")
    return [(r.host, r.sha) for r in failed]


def _failure_line(final: RunRecord) -> str:
    """"run ID on HOST failed: REASON", the line a follower exits 1 with."""
    # The reason already names the exit code ("exited with code 3"); say it once.
    reason = final.reason or (f"exit code {final.exit_code}" if final.exit_code is not None
                              else "no reason recorded")
    where = f" on {final.host}" if final.host else ""
    return f"run {final.id}{where} {final.status}: {reason}"


def _follow(store: StateStore, app: str, run_id: str, raw: bool) -> RunRecord:
    from postdeploy.cli.follow import follow_run

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
@click.option("--follow", "-f", is_flag=True,
              help="Keep printing while the run goes on (any trigger, any host), then "
                   "exit 0 if it succeeded, 1 if not. Ctrl-C stops following, not the run.")
@click.option("--raw", is_flag=True, help=RAW_HELP)
@with_settings
def logs(settings: Settings, app: str, run_id: str | None, follow: bool, raw: bool) -> int:
    """Output of APP's latest run (or RUN_ID): what is stored, or, with --follow,
    everything until the run ends."""
    from postdeploy.trigger.manual import known_apps, require_app

    _, store = open_store(settings)
    require_app(known_apps(settings, store), app)
    record = store.get_run(run_id) if run_id else store.latest_run(app)
    if record is None or record.app != app:
        if run_id:
            raise PostdeployError(f"no run {run_id!r} of {app!r}; "
                                  f"see `postdeploy history {app}`")
        raise PostdeployError(f"{app!r} has no runs yet; see `postdeploy status`")
    click.echo(f"run {record.id} of {app}@{record.sha[:7]} ({record.trigger}): "
               f"{record.status}", err=True)
    if follow:
        final = _follow(store, app, record.id, raw)
        if final.status != "succeeded":
            raise PostdeployError(_failure_line(final))
        click.echo(f"run {final.id} succeeded", err=True)
        return 0
    tail, total = store.read_output(record.id)
    if total > len(tail):
        click.echo(f"... {total - len(tail)} earlier bytes not kept ...")
    out = job_output_stream(raw)
    out.write(tail)
    out.flush()
    return 0


@cli.command()
@click.argument("app")
@click.option("--json", "as_json", is_flag=True, help="Stable JSON (see docs/commands.md).")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
@with_settings
def history(settings: Settings, app: str, as_json: bool, limit: int) -> int:
    """APP's runs, newest first."""
    from postdeploy.cli.views import history_json, history_table
    from postdeploy.trigger.manual import known_apps, require_app

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
    from postdeploy.errors import UnknownApp
    from postdeploy.run.cancel import NotThatAppsRun, cancel_and_report, pick_run
    from postdeploy.trigger.manual import known_apps, require_app

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
    from postdeploy.trigger.manual import check_now, known_apps, require_app

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
@click.argument("app", required=False)
@click.option("--test", "send_test", is_flag=True,
              help="Send a test message to each URL and say whether it arrived.")
@with_settings
def notify(settings: Settings, app: str | None, send_test: bool) -> int:
    """Try the notification URLs (POSTDEPLOY_NOTIFY, and APP's `notify:`; all without APP)."""
    from postdeploy.announce.notify import destinations
    from postdeploy.announce.notify import send_test as send_test_message

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


@cli.command()
@click.argument("directory", required=False, default=".",
                type=click.Path(file_okay=False, path_type=Path))
@click.option("--app", "app_name", default=None,
              help="The configured app DIR belongs to: also say who its job runs as "
                   "(default: the `path` app whose working copy DIR is).")
@with_settings
def validate(settings: Settings, directory: Path, app_name: str | None) -> int:
    """Lint an app repo's appspec.yaml, folder, command and script; and its job user."""
    from postdeploy.cli.validate import has_errors, job_user_finding, validate_app_dir

    findings = validate_app_dir(directory)
    app = settings.app(app_name) if app_name else next(
        (a for a in settings.apps if a.path and Path(a.path).resolve() == directory.resolve()),
        None)
    if app_name and app is None:
        names = ", ".join(a.name for a in settings.apps) or "none"
        raise ConfigError(f"unknown app {app_name!r}; apps in this configuration: {names}")
    if app is not None:
        findings.append(job_user_finding(settings, app))
    for finding in findings:
        click.echo(str(finding))
    errors = sum(1 for f in findings if f.level == "error")
    warnings = sum(1 for f in findings if f.level == "warning")
    click.echo(f"{directory}: {errors} error(s), {warnings} warning(s)")
    return EXIT_FAILED if has_errors(findings) else 0
