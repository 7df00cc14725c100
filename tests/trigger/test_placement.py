"""Placement decisions of each host, on a real Redis and real working copies.

The worker-level behaviour (the runs themselves) is in tests/test_hosts.py;
here each host's loop step is called directly, so every interleaving is exact.
"""

from __future__ import annotations

from pathlib import Path

import redis

from postdeploy.config.settings import AppConfig, Settings
from postdeploy.run.place import INSTANCE_SCOPE_MARK, mark_cancelled
from postdeploy.store import keys
from postdeploy.store.instances import InstanceRegistry
from postdeploy.store.state import StateStore
from postdeploy.trigger.instances import InstanceReporter, LocalSpecs
from postdeploy.trigger.placement import HostPlacement, RunRequest
from tests.support.core import GitRemote, appspec_yaml, run_git


class SimHost:
    """One host's reporter and placement, with its own working copy of the origin."""

    def __init__(self, name: str, root: Path, remote: GitRemote, client: redis.Redis,
                 boot_id: str = "boot-1") -> None:
        self.workdir = root / name / "shop"
        run_git(root, "clone", "-q", remote.url, str(self.workdir))
        self.remote = remote
        self.settings = Settings(host=name, boot_id=boot_id, check_interval=1.0,
                                 state_dir=root / name / "state",
                                 apps=(AppConfig(name="shop", path=str(self.workdir)),))
        self.queued: list[RunRequest] = []
        self.client = client
        self.reboot(boot_id)

    def reboot(self, boot_id: str) -> None:
        self.settings = Settings(**{**self.settings.__dict__, "boot_id": boot_id})
        store = StateStore(self.client)
        specs = LocalSpecs(self.settings)
        self.reporter = InstanceReporter(self.settings, self.client, specs)
        self.placement = HostPlacement(self.settings, store, InstanceRegistry(self.client),
                                       specs, self.queued.append)

    def step(self) -> list[RunRequest]:
        return self.placement.reconcile(self.reporter.report_once())

    def pull(self) -> None:
        run_git(self.workdir, "pull", "-q", "origin", self.remote.branch)

    def move(self, sha: str) -> None:
        """The deploy tool puts this host's working copy at ``sha`` (backwards too)."""
        run_git(self.workdir, "fetch", "-q", "origin")
        run_git(self.workdir, "reset", "-q", "--hard", sha)


def test_a_commit_runs_on_the_host_that_has_it(tmp_path: Path, remote: GitRemote,
                                               rclient: redis.Redis) -> None:
    c1 = remote.commit({"appspec.yaml": appspec_yaml("echo hi")}, "c1")
    a = SimHost("host-a", tmp_path, remote, rclient)
    b = SimHost("host-b", tmp_path, remote, rclient)
    first = a.step() + b.step()
    assert [(r.sha, r.host, r.scope) for r in first] == [(c1, "host-a", "app")]
    assert a.step() + b.step() == []  # claimed: nothing twice

    rclient.set(keys.done("shop", 1), first[0].run_id)  # as the run would
    c2 = remote.commit({"appspec.yaml": appspec_yaml("echo hi"), "v": "2"}, "c2")
    b.pull()  # only host-b has C2 so far
    assert a.step() == []  # host-a is behind: it neither runs C2 nor C1 again
    second = b.step()
    assert [(r.sha, r.host) for r in second] == [(c2, "host-b")]
    store = StateStore(rclient)
    for _ in range(3):  # the lagging host never makes the commit flip back
        a.step()
        assert store.last_seen("shop") == c2
    a.pull()
    assert a.step() + b.step() == []
    assert store.last_seen("shop") == c2


def test_a_claim_of_a_vanished_host_lapses(tmp_path: Path, remote: GitRemote,
                                           rclient: redis.Redis) -> None:
    c1 = remote.commit({"appspec.yaml": appspec_yaml("echo hi")}, "c1")
    a = SimHost("host-a", tmp_path, remote, rclient)
    b = SimHost("host-b", tmp_path, remote, rclient)
    assert [r.host for r in a.step()] == ["host-a"]
    assert b.step() == []
    # host-a vanishes: nobody renews its claim; it lapses like the instance does.
    rclient.delete(keys.claim("shop", 1))
    taken = b.step()
    assert [(r.sha, r.host) for r in taken] == [(c1, "host-b")]
    history = StateStore(rclient).history("shop")
    assert [(r.host, r.status) for r in history] == [("host-b", "queued"),
                                                     ("host-a", "superseded")]
    assert "host-a stopped before the run started" in (history[1].reason or "")


def test_scope_instance_once_per_host_and_boot(tmp_path: Path, remote: GitRemote,
                                               rclient: redis.Redis) -> None:
    spec = appspec_yaml("echo hi", envs={"POST_DEPLOY_SCOPE": "instance"})
    c1 = remote.commit({"appspec.yaml": spec}, "c1")
    a = SimHost("host-a", tmp_path, remote, rclient)
    b = SimHost("host-b", tmp_path, remote, rclient)
    queued = a.step() + b.step()
    assert sorted((r.host, r.sha, r.scope) for r in queued) == [
        ("host-a", c1, "instance"), ("host-b", c1, "instance")]
    assert rclient.get(keys.done("shop", 1)) == INSTANCE_SCOPE_MARK.encode()
    registry = InstanceRegistry(rclient)
    for host, request in ((a, queued[0]), (b, queued[1])):
        registry.mark_instance_done("shop", host.settings.host, host.settings.boot_id, 1,
                                    request.run_id)
    assert a.step() + b.step() == []
    # A later host, and a rebooted one, run it; a restarted executor (same boot) does not.
    c = SimHost("host-c", tmp_path, remote, rclient)
    assert [(r.host, r.sha) for r in c.step()] == [("host-c", c1)]
    b.reboot("boot-1")
    assert b.step() == []
    a.reboot("boot-2")
    assert [(r.host, r.sha) for r in a.step()] == [("host-a", c1)]


def test_a_cancelled_instance_run_is_done_on_its_instance_only(
        tmp_path: Path, remote: GitRemote, rclient: redis.Redis) -> None:
    spec = appspec_yaml("echo hi", envs={"POST_DEPLOY_SCOPE": "instance"})
    remote.commit({"appspec.yaml": spec}, "c1")
    a = SimHost("host-a", tmp_path, remote, rclient, boot_id="boot-a")
    b = SimHost("host-b", tmp_path, remote, rclient)
    (request,) = a.step()
    b.step()
    store = StateStore(rclient)
    record = store.get_run(request.run_id)
    assert record is not None and record.host == "host-a"
    mark_cancelled(b.settings, store, record)  # from another machine: host-a's boot counts
    registry = InstanceRegistry(rclient)
    assert registry.instance_done("shop", "host-a", "boot-a", 1)
    assert not registry.instance_done("shop", "host-b", "boot-1", 1)
    assert rclient.get(keys.done("shop", 1)) == INSTANCE_SCOPE_MARK.encode()
    assert a.step() == []  # not run again there


def finish(rclient: redis.Redis, requests: list[RunRequest]) -> None:
    """As the runs would on their hosts: each request's run done, for its scope."""
    store, registry = StateStore(rclient), InstanceRegistry(rclient)
    for request in requests:
        record = store.get_run(request.run_id)
        assert record is not None and record.deployment is not None
        if request.scope == "instance":
            registry.mark_instance_done("shop", request.host, "boot-1", record.deployment,
                                        request.run_id)
        else:
            store.mark_done("shop", record.deployment, request.run_id)


def test_a_host_catching_up_through_commits_the_fleet_left_starts_nothing(
        tmp_path: Path, remote: GitRemote, rclient: redis.Redis) -> None:
    c1 = remote.commit({"appspec.yaml": appspec_yaml("echo hi")}, "c1")
    a = SimHost("host-a", tmp_path, remote, rclient)
    b = SimHost("host-b", tmp_path, remote, rclient)
    finish(rclient, a.step() + b.step())
    c2 = remote.commit({"appspec.yaml": appspec_yaml("echo hi"), "v": "2"}, "c2")
    a.move(c2)
    finish(rclient, a.step())
    c3 = remote.commit({"appspec.yaml": appspec_yaml("echo hi"), "v": "3"}, "c3")
    a.move(c3)
    assert [(r.sha, r.host) for r in a.step() + b.step()] == [(c3, "host-a")]
    b.move(c2)  # host-b, behind at C1, moves to C2: a commit the fleet already left
    assert a.step() + b.step() == []
    store = StateStore(rclient)
    assert store.last_seen("shop") == c3 and store.deployments.current_id("shop") == 3
    b.move(c3)  # and reaches the fleet's commit: it joins deployment 3
    assert a.step() + b.step() == [] and store.deployments.current_id("shop") == 3
    assert [(r.sha, r.deployment, r.previous_sha) for r in reversed(store.history("shop"))] \
        == [(c1, 1, None), (c2, 2, c1), (c3, 3, c2)]


def test_scope_instance_runs_each_deployment_once_per_host_a_rollback_too(
        tmp_path: Path, remote: GitRemote, rclient: redis.Redis) -> None:
    spec = appspec_yaml("echo hi", envs={"POST_DEPLOY_SCOPE": "instance"})
    c1 = remote.commit({"appspec.yaml": spec}, "c1")
    a = SimHost("host-a", tmp_path, remote, rclient)
    b = SimHost("host-b", tmp_path, remote, rclient)

    def step() -> list[tuple[str, str]]:
        requests = a.step() + b.step()
        finish(rclient, requests)
        return [(r.host, r.sha) for r in requests]

    assert step() == [("host-a", c1), ("host-b", c1)]
    c2 = remote.commit({"appspec.yaml": spec, "v": "2"}, "c2")
    a.move(c2)  # deployment 2
    assert step() == [("host-a", c2)]
    b.move(c2)  # joins it: its own instance runs it once
    assert step() == [("host-b", c2)]
    a.move(c1)  # the fleet moves back: deployment 3, on every instance again
    assert step() == [("host-a", c1)]
    b.move(c1)
    assert step() == [("host-b", c1)]
    assert step() == []  # unchanged heads: nothing more
