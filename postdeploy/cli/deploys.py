"""Commands about deployments: `wait` (a pipeline waits for the job) and `why` (a
commit's story: each decision taken for it, with times and hosts)."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import click

from postdeploy.cli.group import EXIT_FAILED, EXIT_USAGE, cli, fail, open_store, with_settings
from postdeploy.config.settings import Settings
from postdeploy.errors import PostdeployError

WAIT_TIMEOUT = 900.0  # seconds `wait` waits by default: past the default job timeout
POLL = 1.0  # seconds between looks
ROLLBACK_CHECKS = 3  # check intervals a commit deployed before gets to be seen again
PROGRESS_EVERY = 15.0  # seconds between progress lines when nothing changes


@cli.command()
@click.argument("app")
@click.option("--sha", help="The deployed commit to wait for (full or a known prefix; "
                            "default: the app's current one).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=WAIT_TIMEOUT,
              show_default=True, help="Seconds to wait before giving up.")
@click.option("--json", "as_json", is_flag=True, help="Print the verdict as JSON at the end.")
@with_settings
def wait(settings: Settings, app: str, sha: str | None, timeout: float, as_json: bool) -> int:
    """Wait for APP's deployment of SHA to run its job (on every instance for scope
    `instance`); exit 0 only if it succeeded everywhere, 1 if it failed, was replaced,
    has no job, or did not finish within --timeout. For a CI pipeline, after its deploy
    step."""
    from postdeploy.errors import UnknownApp
    from postdeploy.source.git import is_sha
    from postdeploy.store.verdict import PENDING, SUCCEEDED, judge
    from postdeploy.trigger.manual import known_apps, pick_commit, require_app

    _, store = open_store(settings)
    apps = known_apps(settings, store)
    try:
        require_app(apps, app)
    except UnknownApp as exc:  # 2, not 1: a pipeline must tell a typo from a failed job
        return fail(str(exc), EXIT_USAGE)
    if sha is not None and not is_sha(sha.strip().lower()):
        sha = pick_commit(settings, store, apps[app], app, sha)  # a prefix of a known one
    elif sha is not None:
        sha = sha.strip().lower()  # maybe not seen yet: that is what we wait for
    began, started_at = time.monotonic(), time.time()
    # A commit deployed before and replaced since is being deployed again (a
    # rollback) until the checks had time to see it; then it was just replaced.
    rollback_grace = ROLLBACK_CHECKS * settings.check_interval
    said, said_at = "", 0.0
    while True:
        verdict = judge(store, app, sha)
        waited = time.monotonic() - began
        if (last := verdict.deployment) is not None and not verdict.current:
            if last.at >= started_at:
                pass  # deployed, and replaced, while we waited: its verdict stands
            elif waited < min(rollback_grace, timeout):
                verdict = replace(verdict, state=PENDING, text=(
                    f"{last.sha[:7]} is not the deployed commit; waiting for "
                    f"it to be deployed again (its last deployment: {verdict.text})"))
            else:
                raise PostdeployError(f"{last.sha[:7]} is not deployed now "
                                      f"(its last deployment: {verdict.text})")
        if verdict.finished:
            break
        if waited >= timeout:
            raise PostdeployError(f"gave up after {timeout:g} s: {verdict.text}")
        if verdict.text != said or time.monotonic() - said_at >= PROGRESS_EVERY:
            click.echo(f"waiting ({waited:.0f} s): {verdict.text}", err=True)
            said, said_at = verdict.text, time.monotonic()
        time.sleep(POLL)
    if as_json:
        click.echo(json.dumps(verdict.public(), indent=2, sort_keys=True))
    if verdict.state == SUCCEEDED:
        click.echo(verdict.text, err=True)
        return 0
    click.echo(f"postdeploy: {verdict.text}", err=True)
    return EXIT_FAILED


@cli.command()
@click.argument("app")
@click.argument("sha", required=False)
@click.option("--json", "as_json", is_flag=True, help="Stable JSON (see docs/commands.md).")
@with_settings
def why(settings: Settings, app: str, sha: str | None, as_json: bool) -> int:
    """Why APP's job ran or not for SHA (default: the current commit): its
    deployments, each decision and each run, with times and hosts."""
    from postdeploy.cli.views import why_table
    from postdeploy.store.decisions import story
    from postdeploy.store.verdict import judge
    from postdeploy.trigger.manual import known_apps, pick_commit, require_app

    _, store = open_store(settings)
    apps = known_apps(settings, store)
    require_app(apps, app)
    sha = pick_commit(settings, store, apps[app], app, sha)
    history = store.history(app)
    events = story(store.client, store.deployments, app, sha, history)
    verdict = judge(store, app, sha, history)
    if as_json:
        click.echo(json.dumps({"app": app, "sha": sha, "verdict": verdict.public(),
                               "events": [e.public() for e in events]},
                              indent=2, sort_keys=True))
        return 0
    click.echo(why_table(app, sha, events, verdict.text))
    return 0
