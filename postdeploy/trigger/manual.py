"""Manual actions from the CLI: which apps exist, which commit to run, queueing a run,
checking commits now.

The CLI may run where no app is configured (only `up` knows them), so the apps
are those the worker and beat registered in Redis plus any configured here.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

from celery.exceptions import TimeoutError as CeleryTimeout

from postdeploy.config.redaction import MASK
from postdeploy.config.settings import AppConfig, Settings
from postdeploy.errors import GitError, PostdeployError, UnknownApp
from postdeploy.source.git import AppSource, is_sha
from postdeploy.store.celery_app import app as celery
from postdeploy.store.celery_app import configure, enqueue_run
from postdeploy.store.instances import Instance
from postdeploy.store.lifecycle import new_run
from postdeploy.store.records import RunRecord, Trigger
from postdeploy.store.state import StateStore

_HEX = re.compile(r"^[0-9a-f]{4,40}$")


class UnknownCommit(PostdeployError):
    """A --sha that is malformed or not a commit of the app."""


class UnknownHost(PostdeployError):
    """--host or --all-instances names no live instance, or one at another commit."""

CHECK_APP = "postdeploy.check_app"  # the task `check` sends


def known_apps(settings: Settings, store: StateStore) -> dict[str, AppConfig | None]:
    """App name -> its config when we can rebuild one (for git checks), else None."""
    apps: dict[str, AppConfig | None] = {}
    for name, info in store.registered_apps().items():
        source = info.get("source") or ""
        if info.get("kind") == "path":
            apps[name] = AppConfig(name=name, path=source)
        elif MASK not in source:  # a redacted URL cannot be used to reach the repo
            apps[name] = AppConfig(name=name, repo=source, branch=info.get("branch"))
        else:
            apps[name] = None
    for app in settings.apps:
        apps[app.name] = app
    return dict(sorted(apps.items()))


def require_app(apps: dict[str, AppConfig | None], name: str) -> None:
    if name not in apps:
        listed = ", ".join(apps) or "none yet"
        raise UnknownApp(f"unknown app {name!r} (known apps: {listed}); "
                         "check the name with `postdeploy status`")


def pick_commit(settings: Settings, store: StateStore, app: AppConfig | None, name: str,
                sha: str | None) -> str:
    """The full sha to run: ``sha`` (full, or a prefix of a known one) or the last seen."""
    if sha is None:
        last = store.last_seen(name)
        if last is None:
            raise UnknownCommit(f"no commit of {name!r} has been seen yet; wait for the first "
                                f"check, run `postdeploy check {name}`, or pass --sha")
        return last
    text = sha.strip().lower()
    if not _HEX.match(text):
        raise UnknownCommit(f"invalid --sha {sha[:50]!r}: give a commit id "
                            "(40 hex characters, or an unambiguous prefix of a known one)")
    known = _known_commits(store, name)
    if not is_sha(text):
        matches = sorted({s for s in known if s.startswith(text)})
        if len(matches) != 1:
            why = "matches several commits" if matches else "matches no commit run so far"
            raise UnknownCommit(f"--sha {text!r} {why}; give the full 40-character "
                                f"commit id (see `postdeploy history {name}`)")
        return matches[0]
    if text not in known and app is not None:
        _check_commit_exists(settings, app, text)
    return text


def pick_targets(app: AppConfig | None, name: str, sha: str | None,
                 instances: list[Instance], host: str | None = None,
                 all_instances: bool = False) -> list[tuple[str | None, str]]:
    """Where a manual run of ``sha`` goes: [(host or None for any host, commit)].

    A ``path`` app's job only ever runs in a working copy at the run's commit, so
    it goes to a host whose instance is at ``sha`` (None: with ``host`` or
    ``all_instances``, each instance's own commit). ``host`` and ``all_instances``
    ask for given instances; they must be alive.
    """
    path_app = app is not None and app.path is not None
    listed = ", ".join(f"{i.host} at {(i.sha or '-')[:7]}" for i in instances) or "none"
    if host is not None:
        chosen = [i for i in instances if i.host == host]
        if not chosen:
            raise UnknownHost(f"{name!r} has no live instance on host {host!r} (instances: "
                              f"{listed}); see `postdeploy status`")
    elif all_instances:
        chosen = list(instances)
        if not chosen:
            raise UnknownHost(f"{name!r} has no live instances; is a worker running on its "
                              "hosts? (see `postdeploy status`)")
    elif path_app and sha is not None:
        at_commit = [i for i in instances if i.sha == sha]
        if not at_commit:
            raise UnknownHost(f"no host's working copy of {name!r} is at {sha[:7]} "
                              f"(instances: {listed}); pull it on a host first")
        # A ready instance first: its app serves the commit already.
        at_commit.sort(key=lambda i: (i.ready is False, i.host))
        return [(at_commit[0].host, sha)]
    elif sha is not None:
        return [(None, sha)]
    else:
        raise UnknownCommit(f"no commit given for {name!r}")
    if sha is None:
        unknown = [i.host for i in chosen if not i.sha]
        if unknown:
            raise UnknownHost(f"{name!r} on {', '.join(unknown)} reports no commit (not a "
                              "git working copy there?); see `postdeploy status`")
        return [(i.host, i.sha or "") for i in chosen]
    if path_app:
        behind = ", ".join(f"{i.host} ({(i.sha or '-')[:7]})" for i in chosen if i.sha != sha)
        if behind:
            raise UnknownHost(
                f"the working copy of {name!r} is not at {sha[:7]} on {behind}; a job only "
                "runs in a working copy at its commit (pull it there, or pick --host)")
    return [(i.host, sha) for i in chosen]


def queue_manual_run(settings: Settings, url: str, store: StateStore, name: str,
                     sha: str, host: str | None = None) -> RunRecord:
    """Record a queued manual run and put its message on the queue (``host``'s, if given)."""
    configure(settings, url)

    # The soft time limit is the commit's POST_DEPLOY_TIMEOUT when an earlier run read
    # it; otherwise the worker arms the same deadline once it reads appspec.yaml.
    timeout = next((r.timeout for r in store.history(name) if r.sha == sha and r.timeout),
                   None)
    # A manual run is of no deployment's markers, but tells its job what it replaced.
    record = new_run(store, name, sha, Trigger.MANUAL, None, store.deployments.of_sha(name, sha),
                     host)
    enqueue_run(name, sha, Trigger.MANUAL.value, record.id, timeout, host=host)
    return record


def check_now(settings: Settings, url: str, names: list[str],
              timeout: float) -> Iterator[tuple[str, bool]]:
    """Ask the workers to check each app now; yield (line to print, went well)."""
    configure(settings, url)
    pending = [(name, celery.send_task(CHECK_APP, args=[name], expires=timeout))
               for name in names]
    deadline = time.monotonic() + timeout
    answered = 0
    for name, result in pending:
        try:
            value = result.get(timeout=max(0.1, deadline - time.monotonic()))
        except CeleryTimeout:
            yield f"{name}: no answer within {timeout:g} s", False
            continue
        except Exception as exc:  # the task's own error, rebuilt from JSON by Celery
            answered += 1
            yield f"{name}: check failed: {exc}", False
            continue
        answered += 1
        yield describe_check(value), value.get("action") != "error"
    if not answered:
        raise PostdeployError(f"no worker answered within {timeout:g} s; is `postdeploy up` "
                              "(or a worker) running?")


def describe_check(result: dict[str, str | None]) -> str:
    """One line for a postdeploy.check_app result (app/sha/action/detail)."""
    app, sha, action, detail = (result.get(k) for k in ("app", "sha", "action", "detail"))
    at = f"{(sha or '')[:7]}"
    if action == "enqueued":
        return f"{app}: new commit {at}, job queued (run {detail})"
    if action == "unchanged":
        return f"{app}: unchanged at {at}; nothing to run"
    if action == "per-instance":
        return f"{app}: new commit {at}, its job runs once on every instance (scope instance)"
    if action == "no-command":
        return f"{app}: {at} sets no POST_DEPLOY_COMMAND; nothing to run"
    return f"{app}: check failed: {detail}"


def _known_commits(store: StateStore, name: str) -> set[str]:
    commits = {r.sha for r in store.history(name)}
    last = store.last_seen(name)
    if last:
        commits.add(last)
    return commits


def _check_commit_exists(settings: Settings, app: AppConfig, sha: str) -> None:
    """Refuse a commit the app's repository does not have, when we can tell here.

    Only where this host already has the app's clone (or its working copy): the
    CLI must not start cloning repositories as a side effect.
    """
    source = AppSource(app, settings.state_dir)
    if app.repo and not (source.clone_dir / ".git").exists():
        return
    try:
        source.ensure_commit(sha)  # fetches a newer commit
    except GitError as exc:
        if "not found" in str(exc):
            raise UnknownCommit(f"commit {sha[:12]} is not in {app.source}; "
                                f"see `postdeploy history {app.name}` for its commits") from None
        # Network trouble: let the run itself try and record what happens.
