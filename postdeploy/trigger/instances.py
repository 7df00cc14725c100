"""Instances: one app on one host, as its worker reports it to the others.

Every worker reports, for each app it serves, the commit on its host (a
``path`` app: the HEAD of its working copy there; a ``repo`` app: the last
seen commit), whether the app is ready (the readiness gate's probe, when the
app sets POST_DEPLOY_WAIT_URL), the host's boot id and when it reported: at
start-up and every check interval. An instance not reported for three of its
intervals is gone. Reports never wait on a probe: probes run in threads of
their own and a report says what the latest finished one found, so one app's
slow health endpoint never delays the reports (and placements) of the others.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import redis

from postdeploy.config.settings import AppConfig, Settings
from postdeploy.errors import AppSpecError, GitError
from postdeploy.run.env import job_environment
from postdeploy.source.appspec import JobSpec, parse_appspec
from postdeploy.source.git import AppSource, CommitMissing
from postdeploy.source.readiness import Gate, Probe, gate_url, probe
from postdeploy.store import keys
from postdeploy.store.instances import Instance, InstanceRegistry

log = logging.getLogger(__name__)

PROBE_THREADS = 8  # health probes at once: a few hanging endpoints must not stall a round
# Seconds a report waits for the probes it started: a healthy endpoint answers within
# it, so reports are fresh; a slow one is reported on its next round.
FRESH_PROBE_WAIT = 0.5
NOT_HERE = "the commit is not on this host yet"


class InstanceReporter:
    """This host's reports: what each app's commit is here and whether it is ready."""

    def __init__(self, settings: Settings, client: redis.Redis,
                 specs: LocalSpecs | None = None, probes: ReadinessWatch | None = None
                 ) -> None:
        """Without ``probes`` readiness is not probed: each report keeps what this host's
        previous one said (a one-off check must not wait on a health endpoint)."""
        self.settings = settings
        self.client = client
        self.registry = InstanceRegistry(client)
        self.specs = specs or LocalSpecs(settings)
        self.probes = probes

    def report_once(self, only: Sequence[AppConfig] | None = None
                    ) -> list[tuple[str, Instance]]:
        """Report each app (or ``only`` these) of this host; return the reports."""
        apps = list(self.settings.apps if only is None else only)
        shas = self._repo_shas([a for a in apps if a.repo])
        shas.update({app.name: self._path_sha(app) for app in apps if not app.repo})
        gated = {app.name: self._gate(app, sha) for app in apps
                 if (sha := shas[app.name]) is not None}
        todo = {name: g for name, g in gated.items() if g is not None}
        probes = self.probes.latest(todo, shas) if self.probes else {}
        probes.update(self._previous([name for name in todo if name not in probes]))
        now = time.time()
        reports = []
        for app in apps:
            result = probes.get(app.name)
            reports.append((app.name, Instance(
                host=self.settings.host, sha=shas[app.name],
                ready=result.ready if result else None, seen_at=now,
                boot_id=self.settings.boot_id, every=self.settings.check_interval,
                answer=result.answer if result else None)))
        self.registry.report(reports)
        return reports

    def _previous(self, names: Sequence[str]) -> dict[str, Probe]:
        """What this host last reported about these apps' readiness."""
        if not names:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.hget(keys.instances(name), self.settings.host)
        found = {}
        for name, raw in zip(names, pipe.execute(), strict=True):
            before = Instance.from_json(raw) if raw else None
            if before is not None and before.ready is not None:
                found[name] = Probe(before.ready, before.answer or "")
        return found

    def _repo_shas(self, apps: Sequence[AppConfig]) -> dict[str, str | None]:
        """A ``repo`` app's commit is its last seen one: one round trip for all of them."""
        if not apps:
            return {}
        values = self.client.mget([keys.last_seen(a.name) for a in apps])
        return {a.name: (v.decode() if isinstance(v, bytes) else v) or None
                for a, v in zip(apps, values, strict=True)}

    def _path_sha(self, app: AppConfig) -> str | None:
        try:
            return AppSource(app, self.settings.state_dir).current_sha()
        except GitError as exc:
            log.debug("instance report: no commit for %s here: %s", app.name, exc)
            return None

    def _gate(self, app: AppConfig, sha: str) -> tuple[Gate, dict[str, str]] | None:
        spec = self.specs.get(app, sha).spec
        if spec is None or spec.gate is None:
            return None
        return spec.gate, job_environment(self.settings.environ, spec.env, app.name, sha)


@dataclass(frozen=True)
class LocalSpec:
    """The appspec at one commit as this host reads it: a JobSpec or why there is none."""

    sha: str
    spec: JobSpec | None
    problem: str | None = None  # malformed, or the commit is not on this host


class LocalSpecs:
    """Each app's appspec at its current commit here, read once per commit, never fetched."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._cache: dict[str, LocalSpec] = {}

    def get(self, app: AppConfig, sha: str) -> LocalSpec:
        cached = self._cache.get(app.name)
        if cached is None or cached.sha != sha:
            cached = self._read(app, sha)
            if cached.spec is not None or cached.problem != NOT_HERE:
                self._cache[app.name] = cached  # a missing commit may arrive: look again
        return cached

    def _read(self, app: AppConfig, sha: str) -> LocalSpec:
        source = AppSource(app, self.settings.state_dir)
        try:
            if app.repo and not (source.clone_dir / ".git").exists():
                return LocalSpec(sha, None, NOT_HERE)
            text = source.read_appspec(sha, fetch="never")
            return LocalSpec(sha, parse_appspec(text, self.settings.environ))
        except CommitMissing:
            return LocalSpec(sha, None, NOT_HERE)
        except (AppSpecError, GitError) as exc:
            log.debug("%s@%s: appspec not usable here: %s", app.name, sha[:7], exc)
            return LocalSpec(sha, None, str(exc))


class ReadinessWatch:
    """This host's gate probes, in threads of their own; at most one per app at a time."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(PROBE_THREADS, thread_name_prefix="readiness")
        self._running: dict[str, tuple[str | None, Future[Probe]]] = {}
        self._found: dict[str, tuple[str | None, Probe]] = {}

    def latest(self, gated: Mapping[str, tuple[Gate, dict[str, str]]],
               shas: Mapping[str, str | None]) -> dict[str, Probe]:
        """Start a probe of each app that has none running; return the latest finished
        result of each app at its current commit, waiting at most FRESH_PROBE_WAIT."""
        started = []
        for name, (gate, env) in gated.items():
            if name not in self._running:
                future = self._pool.submit(_probe_gate, gate, env, shas.get(name))
                self._running[name] = (shas.get(name), future)
                started.append(future)
        if started:
            wait(started, FRESH_PROBE_WAIT)
        for name, (sha, future) in list(self._running.items()):
            if future.done():
                del self._running[name]
                self._found[name] = (sha, future.result())
        return {name: probe for name, (sha, probe) in self._found.items()
                if name in gated and sha == shas.get(name)}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _probe_gate(gate: Gate, env: Mapping[str, str], sha: str | None) -> Probe:
    try:
        url = gate_url(gate, env)
    except AppSpecError as exc:
        return Probe(False, str(exc))
    return probe(url, sha if gate.wait_for_commit else None)


class HostLoop:
    """A thread in the worker's main process: report now, then every check interval.

    In a thread of the main process, not a task: reports must go on while every
    pool process runs a long job, or the host would look gone.
    """

    def __init__(self, reporter: InstanceReporter, interval: float,
                 then: Callable[[list[tuple[str, Instance]]], object] | None = None) -> None:
        self.reporter = reporter
        self.interval = interval
        self.then = then
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="instance-reports",
                                        daemon=True)

    def start(self) -> HostLoop:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                reports = self.reporter.report_once()
                if self.then is not None:
                    self.then(reports)
            except redis.RedisError as exc:
                log.debug("instance report skipped (Redis unavailable): %s", exc)
            except Exception:  # a bug must not end the reports of every app
                log.exception("instance report failed")
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))
