"""One verdict per deployment: did its job succeed, everywhere it had to run?

For scope ``app`` the deployment's latest automatic run decides. For scope
``instance`` every live instance must have run it: "succeeded on 5 of 6 hosts;
failed on web-3: exit 2". `wait`, `status`, notifications and metrics all ask
:func:`judge`, so they never disagree. Manual runs are the operator's and never
count.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from postdeploy.store.deployments import Deployment
from postdeploy.store.instances import Instance, InstanceRegistry
from postdeploy.store.records import RunRecord, Status, Trigger
from postdeploy.store.state import INSTANCE_SCOPE_MARK, NO_COMMAND_MARK, StateStore

PENDING, SUCCEEDED, FAILED = "pending", "succeeded", "failed"
NO_COMMAND, NOT_SEEN, REPLACED = "no-command", "not-seen", "replaced"
# Ended for good; a lost or superseded run is followed by another (or by nothing).
_FINAL = frozenset({Status.SUCCEEDED, Status.FAILED, Status.TIMED_OUT, Status.ERROR,
                    Status.CANCELLED})


@dataclass(frozen=True)
class Verdict:
    state: str  # PENDING, SUCCEEDED, FAILED, NO_COMMAND, NOT_SEEN or REPLACED
    text: str  # one line for people
    deployment: Deployment | None = None
    runs: tuple[RunRecord, ...] = ()  # the deciding run of each host (scope app: one)
    per_instance: bool = False
    current: bool = True  # the deployment is the app's current one

    @property
    def finished(self) -> bool:
        return self.state not in (PENDING, NOT_SEEN)

    @property
    def failed_hosts(self) -> list[str]:
        return sorted({r.host or "" for r in self.runs
                       if r.status in _FINAL and r.status != Status.SUCCEEDED})

    def public(self) -> dict[str, object]:
        return {"state": self.state, "text": self.text,
                "deployment": self.deployment.id if self.deployment else None,
                "per_instance": self.per_instance, "runs": [r.id for r in self.runs],
                "failed_hosts": self.failed_hosts, "current": self.current}


def judge(store: StateStore, app: str, sha: str | None = None,
          history: list[RunRecord] | None = None) -> Verdict:
    """The verdict on ``app``'s deployment of ``sha`` (default: its current deployment)."""
    deployments = store.deployments
    current = deployments.current(app)
    deployment = current if sha is None else deployments.of_sha(app, sha)
    if deployment is None:
        where = (f"the app is at {current.sha[:7]} (deployment {current.id})" if current
                 else "no commit of it has been seen yet")
        what = f"{sha[:7]} has not been deployed" if sha else "nothing has been deployed"
        return Verdict(NOT_SEEN, f"{what}: {where}")
    verdict = _judge(store, app, current, deployment, history)
    return replace(verdict, current=current is not None and current.id == deployment.id)


def _judge(store: StateStore, app: str, current: Deployment | None, deployment: Deployment,
           history: list[RunRecord] | None) -> Verdict:
    mark_text = store.done_mark(app, deployment.id)
    runs = [r for r in (history if history is not None else store.history(app))
            if r.deployment == deployment.id and r.trigger == Trigger.AUTO]  # newest first
    replaced = current is not None and current.id != deployment.id
    label = f"deployment {deployment.id} ({deployment.sha[:7]})"
    if mark_text == NO_COMMAND_MARK:
        return Verdict(NO_COMMAND, f"{label}: no job, POST_DEPLOY_COMMAND is not set at "
                                   "this commit", deployment)
    if mark_text == INSTANCE_SCOPE_MARK:
        return _per_instance(store, app, deployment, runs, replaced, label)
    decided = next((r for r in runs if r.status in _FINAL), None)
    if decided is not None:
        return _of_runs(deployment, [decided], label, per_instance=False)
    if replaced and not any(not r.status.finished for r in runs):
        assert current is not None
        return Verdict(REPLACED, f"{label} was replaced by deployment {current.id} "
                                 f"({current.sha[:7]}) before its job ran", deployment)
    live = next((r for r in runs if not r.status.finished), None)
    return Verdict(PENDING, f"{label}: {_progress(live)}", deployment,
                   (live,) if live else ())


def _per_instance(store: StateStore, app: str, deployment: Deployment,
                  runs: list[RunRecord], replaced: bool, label: str) -> Verdict:
    instances = InstanceRegistry(store.client).live(app)
    latest: dict[str, RunRecord] = {}
    for run in runs:  # newest first: keep each host's newest
        latest.setdefault(run.host or "", run)
    decided = [r for host, r in sorted(latest.items()) if r.status in _FINAL]
    # Live hosts must run it; a host gone meanwhile counts only if its run ended.
    hosts = sorted({i.host for i in instances} | {r.host or "" for r in decided})
    waiting_on = [h for h in hosts if h not in {r.host for r in decided}]
    if waiting_on and not replaced:
        lines = [f"{h}: {_instance_progress(latest.get(h), instances, h, deployment)}"
                 for h in waiting_on]
        done = len(hosts) - len(waiting_on)
        return Verdict(PENDING, f"{label}: {done} of {len(hosts)} hosts done; "
                                + "; ".join(lines), deployment, tuple(decided),
                       per_instance=True)
    if not decided:
        return Verdict(REPLACED, f"{label} was replaced before any host ran its job",
                       deployment, per_instance=True)
    return _of_runs(deployment, decided, label, per_instance=True)


def _of_runs(deployment: Deployment, runs: list[RunRecord], label: str,
             per_instance: bool) -> Verdict:
    failed = [r for r in runs if r.status != Status.SUCCEEDED]
    if not per_instance:
        run = runs[0]
        where = f" on {run.host or run.worker}" if (run.host or run.worker) else ""
        if not failed:
            return Verdict(SUCCEEDED, f"{label}: succeeded{where} (run {run.id})",
                           deployment, (run,))
        return Verdict(FAILED, f"{label}: {run.status}{where}: {_why(run)} (run {run.id})",
                       deployment, (run,))
    good = len(runs) - len(failed)
    if not failed:
        return Verdict(SUCCEEDED, f"{label}: succeeded on {good} of {len(runs)} hosts",
                       deployment, tuple(runs), per_instance=True)
    details = "; ".join(f"{r.status} on {r.host}: {_why(r)}" for r in failed)
    return Verdict(FAILED, f"{label}: succeeded on {good} of {len(runs)} hosts; {details}",
                   deployment, tuple(runs), per_instance=True)


def _why(run: RunRecord) -> str:
    if run.exit_code not in (None, 0):
        return f"exit {run.exit_code}"
    return run.reason or "no reason recorded"


def _progress(run: RunRecord | None) -> str:
    if run is None:
        return "no run queued yet (the next check queues it)"
    if run.status == Status.WAITING:
        return f"waiting for the app on {run.host or 'its host'}: {run.reason}"
    if run.status == Status.RUNNING:
        return f"running on {run.host or run.worker} (run {run.id})"
    return f"queued (run {run.id}), waiting for a worker"


def _instance_progress(run: RunRecord | None, instances: list[Instance], host: str,
                       deployment: Deployment) -> str:
    if run is not None:
        return _progress(run)
    instance = next((i for i in instances if i.host == host), None)
    if instance is not None and instance.sha != deployment.sha:
        return f"at {(instance.sha or '-')[:7]}, not yet at this commit"
    return "no run queued yet"
