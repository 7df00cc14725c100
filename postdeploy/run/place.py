"""Is this host the right place for a run, now? The run's side of placement.

Placement (:mod:`postdeploy.trigger.placement`) sends a run to a host; when the
run starts there it checks again: its deployment still the latest and not done,
the working copy at the run's commit. Its end marks the deployment done, for the
fleet or for this instance.
"""

from __future__ import annotations

from dataclasses import dataclass

from postdeploy.config.settings import AppConfig, Settings
from postdeploy.errors import GitError
from postdeploy.source.appspec import SCOPE_APP, SCOPE_INSTANCE
from postdeploy.source.git import AppSource
from postdeploy.store import keys
from postdeploy.store.instances import GONE_AFTER, InstanceRegistry
from postdeploy.store.records import RunRecord
from postdeploy.store.state import INSTANCE_SCOPE_MARK, StateStore

MIN_CLAIM_TTL = 10  # seconds: even with a 1 s interval a claim outlives a busy moment


def claim_ttl(interval: float) -> int:
    """Seconds a host's claim lives without renewal: the time an instance takes to go."""
    return max(MIN_CLAIM_TTL, int(GONE_AFTER * interval + 1))



@dataclass(frozen=True)
class RunPlace:
    """Where a run was sent (None: the shared queue, any host) and its scope."""

    host: str | None = None
    scope: str = SCOPE_APP

    @property
    def per_instance(self) -> bool:
        return self.scope == SCOPE_INSTANCE and self.host is not None

    @property
    def slot(self) -> str | None:
        """The host whose instance the run occupies (scope instance), else None: the app."""
        return self.host if self.per_instance else None

    def lock_key(self, app: str) -> str:
        """One run per app at a time; per instance for scope instance."""
        if self.per_instance:
            assert self.host is not None
            return keys.instance_lock(app, self.host)
        return keys.run_lock(app)

    def claim_key(self, app: str, deployment: int | None) -> str | None:
        """The claim a run of ``deployment`` holds (None: a run of no deployment)."""
        if deployment is None:
            return None
        if self.per_instance:
            assert self.host is not None
            return keys.instance_claim(app, self.host, deployment)
        return keys.claim(app, deployment)


def skip_reason(settings: Settings, store: StateStore, app: AppConfig, record: RunRecord,
                place: RunPlace) -> str | None:
    """Why an automatic run should not run (any more): None if it should.

    Its deployment decides, not its commit: after A→B→A, deployment 1's run of A
    never makes deployment 3 (A again) skip, and deployment 2's run of B is
    superseded by deployment 3.
    """
    label = f"deployment {record.deployment} ({record.sha[:7]})"
    if record.deployment is None:
        return f"commit {record.sha[:7]} is not one of {app.name}'s deployments"
    if place.per_instance:
        assert place.host is not None
        registry = InstanceRegistry(store.client)
        if registry.instance_done(app.name, place.host, settings.boot_id, record.deployment):
            return f"{label} already ran on {place.host} since it booted"
        if app.repo:
            return _superseded(store, app.name, record.deployment, label)
        return None
    if store.is_done(app.name, record.deployment):
        return f"{label} already ran"
    return _superseded(store, app.name, record.deployment, label)


def _superseded(store: StateStore, app: str, deployment: int, label: str) -> str | None:
    latest = store.deployments.current(app)
    if latest is not None and latest.id != deployment:
        return (f"{label} is no longer the latest (deployment {latest.id}, "
                f"{latest.sha[:7]}, is)")
    return None


def working_copy_problem(settings: Settings, app: AppConfig, sha: str) -> str | None:
    """A job never runs in a working copy at another commit: why not here, or None."""
    if app.path is None:
        return None  # a repo app's checkout is made at exactly the run's commit
    try:
        head = AppSource(app, settings.state_dir).current_sha()
    except GitError as exc:
        return str(exc)
    if head == sha:
        return None
    return (f"the working copy of {app.name} on {settings.host} is at {head[:7]}, "
            f"not {sha[:7]}")


def mark_done(settings: Settings, store: StateStore, app: str, deployment: int, run_id: str,
              place: RunPlace) -> None:
    """The automatic run of ``deployment`` finished: for the fleet, or for this instance."""
    if place.per_instance:
        assert place.host is not None
        InstanceRegistry(store.client).mark_instance_done(app, place.host, settings.boot_id,
                                                          deployment, run_id)
    else:
        store.mark_done(app, deployment, run_id)


def mark_cancelled(settings: Settings, store: StateStore, record: RunRecord) -> None:
    """A cancelled automatic run's deployment is not run again: on its instance, for scope
    instance (the deployment's app-wide marker says so), else for the fleet."""
    if record.deployment is None:
        return  # a run of no deployment: nothing would run it again anyway
    mark = store.done_mark(record.app, record.deployment)
    if mark != INSTANCE_SCOPE_MARK or not record.host:
        store.mark_done(record.app, record.deployment, record.id)
        return
    registry = InstanceRegistry(store.client)
    # The instance's own boot (the cancel may come from another machine).
    boot = next((i.boot_id for i in registry.live(record.app) if i.host == record.host),
                settings.boot_id)
    registry.mark_instance_done(record.app, record.host, boot, record.deployment, record.id)
