"""Placement: on which host a deployment's job runs, decided by every host each interval.

Each worker's host loop calls :meth:`HostPlacement.reconcile` with the reports
it just made (see :mod:`postdeploy.trigger.instances`):

- A ``path`` app's commit is per host. Each host's HEAD goes to the app's
  deployment log (:meth:`DeploymentLog.host_head`): a host whose HEAD moves
  may start a deployment, a host that is merely behind never makes the app's
  commit flip back. Only a host whose working copy is at the current
  deployment's commit claims its run, and sends it to its own queue: a job
  never runs in a working copy at another commit, and a host that has not
  pulled the commit yet neither runs it nor marks it done.
- POST_DEPLOY_SCOPE ``instance``: every host runs each deployment once when it
  reaches its commit, in its own working copy (or checkout), again after the
  host reboots (a new boot id), not after a restart of the executor.

A claim made here names the host and lives a few intervals; the host's loop
renews it while its run is unfinished. So when a host disappears (powered
off, its worker killed), its claims lapse and another host that has the
commit takes the run over.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import redis

from postdeploy.config.settings import AppConfig, Settings
from postdeploy.run.place import (
    claim_ttl,
    working_copy_problem,
)
from postdeploy.source.appspec import DEFAULT_TIMEOUT, SCOPE_APP, SCOPE_INSTANCE
from postdeploy.store import decisions, keys, lifecycle
from postdeploy.store.deployments import Deployment, Observation
from postdeploy.store.instances import Instance, InstanceRegistry
from postdeploy.store.records import Status, Trigger
from postdeploy.store.state import INSTANCE_SCOPE_MARK, NO_COMMAND_MARK, StateStore
from postdeploy.trigger.instances import LocalSpecs

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class RunRequest:
    """An automatic run to put on ``host``'s queue."""

    app: str
    sha: str
    run_id: str
    timeout: int | None
    host: str
    scope: str


Enqueue = Callable[[RunRequest], None]


class HostPlacement:
    """This host's part in placing runs; one per worker, called from its host loop."""

    def __init__(self, settings: Settings, store: StateStore, registry: InstanceRegistry,
                 specs: LocalSpecs, enqueue: Enqueue) -> None:
        self.settings = settings
        self.store = store
        self.client = store.client
        self.registry = registry
        self.specs = specs
        self.enqueue = enqueue
        self.ttl = claim_ttl(settings.check_interval)
        self._mine: dict[str, str] = {}  # claim key -> id of our unfinished run

    def reconcile(self, reports: Iterable[tuple[str, Instance]]) -> list[RunRequest]:
        """Claim and queue what this host should run now; return what was queued."""
        self._renew_claims()
        mine = [(app, instance) for name, instance in reports
                if instance.sha is not None and (app := self.settings.app(name)) is not None]
        # A repo app's scope is learned by the commit check (it reads the appspec) and
        # left in its deployment's done marker: two round trips for every repo app.
        repo = [app.name for app, _ in mine if app.repo]
        current = {name: n for name, n in zip(
            repo, self.store.deployments.current_ids(repo), strict=True) if n is not None}
        marks = self.client.mget([keys.done(name, n) for name, n in current.items()]) \
            if current else []
        per_instance = {name for name, mark in zip(current, marks, strict=True)
                        if _text(mark) == INSTANCE_SCOPE_MARK}
        queued: list[RunRequest] = []
        for app, instance in mine:
            assert instance.sha is not None
            try:
                if app.path:
                    seen = self.store.deployments.host_head(app.name, self.settings.host,
                                                            instance.sha)
                    requests = [self._path_app(app, instance.sha, seen),
                                self._instance(app, instance.sha, seen.mine)]
                elif app.name in per_instance:
                    requests = [self._instance(app, instance.sha, current[app.name])]
                else:
                    requests = []
                queued += [r for r in requests if r is not None]
            except redis.RedisError:
                raise
            except Exception:  # one app's trouble never stops the others
                log.exception("placement of %s failed", app.name)
        return queued

    # -- scope app, path apps ---------------------------------------------------
    def _path_app(self, app: AppConfig, head: str, seen: Observation) -> RunRequest | None:
        deployment = seen.deployment
        host = self.settings.host
        if seen.started:
            log.info("%s: deployment %d: %s, first on %s (was %s)", app.name, deployment.id,
                     head[:7], host, (deployment.previous_sha or "-")[:7])
            decisions.note(self.client, app.name, head, f"first deployed on {host}: its "
                           "working copy moved to this commit", host)
        if head != deployment.sha:
            log.debug("%s: this host is at %s, behind %s; a host that has it runs it",
                      app.name, head[:7], deployment.sha[:7])
            decisions.note(self.client, app.name, head, f"{host} is at this commit, behind "
                           f"the fleet's {deployment.sha[:7]}: not a deployment, nothing run",
                           host, once=f"behind:{host}:{deployment.id}")
            return None
        local = self.specs.get(app, head)
        if local.spec is not None and local.spec.scope == SCOPE_INSTANCE:
            self.store.mark_decided(app.name, deployment.id, INSTANCE_SCOPE_MARK)
            return None
        claim = keys.claim(app.name, deployment.id)
        if not self._claim(claim, keys.done(app.name, deployment.id)):
            return None
        if local.spec is not None and local.spec.command is None:
            log.info("%s@%s: POST_DEPLOY_COMMAND is not set; no job to run",
                     app.name, head[:7])
            self.store.mark_done(app.name, deployment.id, NO_COMMAND_MARK)
            return None
        # A malformed appspec still gets a run: the run records the problem as `error`.
        timeout = local.spec.timeout if local.spec else DEFAULT_TIMEOUT
        gated = local.spec.gate is not None if local.spec else None
        return self._queue(app.name, deployment, timeout, SCOPE_APP, claim, gated)

    # -- scope instance -------------------------------------------------------
    def _instance(self, app: AppConfig, sha: str, deployment: int | None) -> RunRequest | None:
        """This instance's run of ``deployment`` (the latest one of the commit it is at)."""
        if deployment is None:
            return None  # a commit the app never deployed: this host is behind
        host, boot = self.settings.host, self.settings.boot_id
        if app.path:
            local = self.specs.get(app, sha)
            if local.spec is None or local.spec.scope != SCOPE_INSTANCE:
                return None
            if local.spec.command is None:
                return None
            timeout: int | None = local.spec.timeout
        else:
            timeout = None  # the run reads it from the checkout
        claim = keys.instance_claim(app.name, host, deployment)
        if not self._claim(claim, keys.instance_done(app.name, host, boot, deployment)):
            return None
        # Only forgotten after KEEP later deployments; then its previous commit is unknown.
        found = self.store.deployments.get(app.name, deployment) or Deployment(
            deployment, sha, None, time.time())
        return self._queue(app.name, found, timeout, SCOPE_INSTANCE, claim)

    # -- claims ---------------------------------------------------------------
    def _claim(self, claim: str, done: str) -> bool:
        return self.store.take_claim(claim, done, self.settings.host, self.ttl)

    def _queue(self, app: str, deployment: Deployment, timeout: int | None, scope: str,
               claim: str, gated: bool | None = None) -> RunRequest:
        sha = deployment.sha
        self._retire_stale(app, deployment.id, scope)
        record = lifecycle.new_run(self.store, app, sha, Trigger.AUTO, timeout, deployment,
                                   self.settings.host, gated)
        request = RunRequest(app, sha, record.id, timeout, self.settings.host, scope)
        try:
            self.enqueue(request)
        except Exception:
            self.store.drop_claim(claim)
            raise
        self._mine[claim] = record.id
        where = "on this host" if scope == SCOPE_APP else "for this instance"
        log.info("%s@%s: POST_DEPLOY job queued %s (run %s)", app, sha[:7], where, record.id)
        return request

    def _renew_claims(self) -> None:
        """Keep the claims of our unfinished runs; let those of finished runs go."""
        if not self._mine:
            return
        records = {claim: self.store.get_run(run_id) for claim, run_id in self._mine.items()}
        for claim, record in records.items():
            if record is None or Status(record.status).finished:
                del self._mine[claim]
        self.store.keep_claims(list(self._mine), self.ttl)

    def _retire_stale(self, app: str, deployment: int, scope: str) -> None:
        retire_stale(self.store, app, deployment,
                     self.settings.host if scope == SCOPE_INSTANCE else None)


def retire_stale(store: StateStore, app: str, deployment: int, host: str | None = None) -> None:
    """Automatic runs of ``deployment`` (on ``host``) queued or waiting on a host that
    went away.

    Called only when a claim of the deployment could be taken again, that is when
    nobody kept the old one alive; such a run never starts any more.
    """
    for record in store.history(app, 20):
        if record.deployment != deployment or record.trigger != Trigger.AUTO.value:
            continue
        if host is not None and record.host != host:
            continue
        if record.status in (Status.QUEUED, Status.WAITING) and lifecycle.move(
                store, record, Status.SUPERSEDED,
                reason=f"{record.host or 'its host'} stopped before the run started; the "
                       "deployment was queued again"):
            log.warning("%s@%s: run %s given up: %s", app, record.sha[:7], record.id,
                        record.reason)


def forward_host(settings: Settings, store: StateStore, app: AppConfig, sha: str) -> str | None:
    """For a run of a ``path`` app sent to any host: a host whose working copy is at
    ``sha``, when this one's is not (None: run here, or nowhere better)."""
    if app.path is None or working_copy_problem(settings, app, sha) is None:
        return None
    at_commit = [i for i in InstanceRegistry(store.client).live(app.name)
                 if i.sha == sha and i.host != settings.host]
    at_commit.sort(key=lambda i: (i.ready is False, i.host))
    return at_commit[0].host if at_commit else None


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value
