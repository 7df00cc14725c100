"""Several hosts, one Redis: where and when a job runs (docs/hosts.md).

Each simulated host (tests/hosts.py) has its own POSTDEPLOY_HOST, state
directory, working copy of one origin, PID namespace and an HTTP stand-in for
the app's health endpoint answering with the version it serves.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import psutil
import redis

from postdeploy.config.settings import Settings
from postdeploy.store import keys
from postdeploy.store.celery_app import app as celery_app
from postdeploy.store.celery_app import configure
from postdeploy.store.records import RunRecord
from tests.support.clirun import cli, cli_env
from tests.support.core import GitRemote, Service, appspec_yaml, output_of, runs, wait_for
from tests.support.hosts import Fleet, Host

JOB = 'echo "host=$HOST_LABEL sha=$COMMIT_SHA head=$(git rev-parse HEAD)"'
HEALTH = "http://127.0.0.1:${APP_PORT}/health"
DAEMON_SECONDS = "3001"  # a daemon the tests can tell from any other sleep


def spec(**envs: str) -> str:
    return appspec_yaml(JOB, envs=envs)


def gated(**envs: str) -> str:
    return spec(POST_DEPLOY_WAIT_URL=HEALTH, POST_DEPLOY_WAIT_FOR_COMMIT="true", **envs)


def add(fleet: Fleet, name: str) -> Host:
    return fleet.add(name, extra_env={"HOST_LABEL": name})


def finished(client: redis.Redis, count: int, timeout: float = 40) -> list[RunRecord]:
    def enough() -> list[RunRecord] | None:
        done = [r for r in runs(client, "shop")
                if r.status not in ("queued", "running", "waiting")]
        return done if len(done) >= count else None
    return wait_for(enough, timeout, 0.2, what=f"{count} finished run(s)")


def reports_after(client: redis.Redis, hosts: list[Host], intervals: int = 3) -> None:
    """Let every host report (and place runs) ``intervals`` more times."""
    from postdeploy.store.instances import InstanceRegistry

    registry = InstanceRegistry(client)
    for _ in range(intervals):
        before = {i.host: i.seen_at for i in registry.live("shop")}
        wait_for(lambda b=before: all(  # type: ignore[misc]
            i.seen_at > b.get(i.host, 0) for i in registry.live("shop")
            if i.host in {h.name for h in hosts}), 15, what="another round of reports")


def test_a_commit_reaching_one_host_first_runs_once_there_when_its_app_serves_it(
        fleet: Fleet, remote: GitRemote, rclient: redis.Redis) -> None:
    c1 = remote.commit({"appspec.yaml": gated()}, "c1")
    a, b = add(fleet, "host-a"), add(fleet, "host-b")
    a.start(), b.start()
    first = finished(rclient, 1)[0]
    assert (first.sha, first.status) == (c1, "succeeded")

    c2 = remote.commit({"appspec.yaml": gated(), "v": "2"}, "c2")
    b.pull()  # host-b has C2, but its app still serves C1; host-a is behind
    waiting = wait_for(lambda: next((r for r in runs(rclient, "shop")
                                     if r.sha == c2 and r.status == "waiting"), None), 20,
                       what="the C2 run waiting for host-b's app")
    assert waiting.host == "host-b" and "last answered 200 without commit" in (
        waiting.reason or "")
    reports_after(rclient, [a, b], 3)
    assert [r.status for r in runs(rclient, "shop") if r.sha == c2] == ["waiting"]
    assert rclient.get("postdeploy:app:shop:last_seen") == c2.encode()  # no flip back

    b.serve()
    second = finished(rclient, 2)[1]
    assert (second.sha, second.status, second.host) == (c2, "succeeded", "host-b")
    assert f"host=host-b sha={c2} head={c2}" in output_of(rclient, second.id)

    a.pull(), a.serve()
    reports_after(rclient, [a, b], 4)
    assert [(r.sha, r.status) for r in runs(rclient, "shop")] == [
        (c1, "succeeded"), (c2, "succeeded")]


def test_scope_instance_runs_on_every_host_including_one_that_joins_late(
        fleet: Fleet, remote: GitRemote, rclient: redis.Redis) -> None:
    # The first runs last long enough to overlap: one host's run never ends the other's.
    slow = appspec_yaml(JOB + "; sleep 3", envs={"POST_DEPLOY_SCOPE": "instance"})
    c1 = remote.commit({"appspec.yaml": slow}, "c1")
    a, b = add(fleet, "host-a"), add(fleet, "host-b")
    a.start(), b.start()
    first = finished(rclient, 2)
    assert sorted((r.host, r.sha, r.status) for r in first) == [
        ("host-a", c1, "succeeded"), ("host-b", c1, "succeeded")]
    assert max(r.started_at or 0 for r in first) < min(r.finished_at or 0 for r in first)
    assert all(h.worker is not None and "was lost" not in h.worker.log() for h in (a, b))

    c2 = remote.commit({"appspec.yaml": spec(POST_DEPLOY_SCOPE="instance"), "v": "2"}, "c2")
    a.pull()
    third = finished(rclient, 3)[2]
    assert (third.host, third.sha, third.status) == ("host-a", c2, "succeeded")
    assert f"host=host-a sha={c2} head={c2}" in output_of(rclient, third.id)
    b.pull()
    assert (finished(rclient, 4)[3].host, finished(rclient, 4)[3].sha) == ("host-b", c2)

    c = add(fleet, "host-c")  # joins later, already at C2
    c.start()
    fifth = finished(rclient, 5)[4]
    assert (fifth.host, fifth.sha, fifth.status) == ("host-c", c2, "succeeded")
    reports_after(rclient, [a, b, c], 3)
    assert len(runs(rclient, "shop")) == 5
    assert all(r.status == "succeeded" for r in runs(rclient, "shop"))


def daemons() -> list[psutil.Process]:
    """The `pm2 start`-like daemons the test's jobs leave (seen from outside the hosts)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if proc.info["cmdline"] == ["sleep", DAEMON_SECONDS]:
            found.append(proc)
    return found


def test_an_executor_restart_runs_nothing_a_reboot_runs_scope_instance_again(
        fleet: Fleet, remote: GitRemote, rclient: redis.Redis) -> None:
    job = f"nohup sleep {DAEMON_SECONDS} >/dev/null 2>&1 &"
    c1 = remote.commit({"appspec.yaml": appspec_yaml(job, envs={
        "POST_DEPLOY_SCOPE": "instance"})}, "c1")
    a = add(fleet, "host-a")
    a.start()
    assert finished(rclient, 1)[0].sha == c1
    started = wait_for(daemons, 10, what="the job's daemon")

    a.stop_worker()  # the executor restarts; the machine (and its boot id) stays
    a.start()
    reports_after(rclient, [a], 4)
    assert len(runs(rclient, "shop")) == 1
    assert [p.pid for p in daemons()] == [p.pid for p in started]  # the daemon lives on

    a.reboot()  # every process of the machine ends, the daemon too; a new boot id
    second = finished(rclient, 2)[1]
    assert (second.host, second.sha, second.status) == ("host-a", c1, "succeeded")
    reports_after(rclient, [a], 3)
    assert len(runs(rclient, "shop")) == 2
    now = wait_for(daemons, 10, what="the daemon started again")
    assert [p.pid for p in now] != [p.pid for p in started]


def test_a_gate_that_never_passes_fails_the_run_and_nothing_else(
        fleet: Fleet, remote: GitRemote, rclient: redis.Redis) -> None:
    remote.commit({"appspec.yaml": gated(POST_DEPLOY_WAIT_TIMEOUT="4")}, "c1")
    a = add(fleet, "host-a")
    a.standin.mode = "502"
    a.start()
    failed = finished(rclient, 1, 30)[0]
    assert failed.status == "failed"
    assert failed.reason is not None and failed.reason.startswith(
        f"not ready: http://127.0.0.1:{a.standin.port}/health last answered 502 after ")
    assert failed.started_at is None  # the job itself never started
    assert output_of(rclient, failed.id) == ""
    reports_after(rclient, [a], 3)
    assert len(runs(rclient, "shop")) == 1  # LENIENT: not retried
    assert a.worker is not None and a.worker.alive()


def test_a_host_disappearing_mid_wait_leaves_the_run_to_a_host_that_has_the_commit(
        fleet: Fleet, remote: GitRemote, rclient: redis.Redis) -> None:
    c1 = remote.commit({"appspec.yaml": gated()}, "c1")
    a, b = add(fleet, "host-a"), add(fleet, "host-b")
    a.standin.mode = b.standin.mode = "502"  # neither app is up yet
    a.start(), b.start()
    first = wait_for(lambda: next((r for r in runs(rclient, "shop")
                                   if r.status == "waiting"), None), 20, what="a waiting run")
    gone, other = (a, b) if first.host == "host-a" else (b, a)
    gone.power_off()
    other.standin.mode = "serve"
    done = wait_for(lambda: [r for r in runs(rclient, "shop") if r.status == "succeeded"],
                    40, 0.2, what="the run on the remaining host")
    assert [(r.host, r.sha) for r in done] == [(other.name, c1)]
    earlier = next(r for r in runs(rclient, "shop") if r.id == first.id)
    assert earlier.status == "superseded"
    assert f"{gone.name} stopped before the run started" in (earlier.reason or "")


def test_manual_runs_on_one_host_or_every_instance(
        fleet: Fleet, remote: GitRemote, rclient: redis.Redis, tmp_path: Path) -> None:
    c1 = remote.commit({"appspec.yaml": spec()}, "c1")
    a, b = add(fleet, "host-a"), add(fleet, "host-b")
    a.start(), b.start()
    finished(rclient, 1)
    c2 = remote.commit({"appspec.yaml": spec(), "v": "2"}, "c2")
    b.pull()
    finished(rclient, 2)
    env = cli_env(POSTDEPLOY_REDIS_URL=fleet.redis_url)
    state = tmp_path / "cli"

    # A commit goes where the working copy is at it; a host elsewhere is refused.
    refused = cli(state, "run", "shop", "--sha", c2, "--host", "host-a", env=env)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1
    assert (f"postdeploy: error: the working copy of 'shop' is not at {c2[:7]} on "
            f"host-a ({c1[:7]})") in refused.stderr
    unknown = cli(state, "run", "shop", "--host", "host-x", env=env)
    assert "no live instance on host 'host-x' (instances: host-a at" in unknown.stderr

    routed = cli(state, "run", "shop", "--sha", c2, "--wait", env=env)
    assert routed.returncode == 0, routed.stderr
    assert f"host=host-b sha={c2} head={c2}" in routed.stdout

    # Sent to any host, as Flower's API does: it runs where the working copy is at c2.
    configure(Settings.load({"POSTDEPLOY_REDIS_URL": fleet.redis_url,
                             "POSTDEPLOY_STATE_DIR": str(state)}), fleet.redis_url)
    for count, queue in ((2, "postdeploy.host.host-a"), (3, "postdeploy"), (4, "postdeploy")):
        celery_app.send_task("postdeploy.run_job", kwargs={"app": "shop", "sha": c2},
                             queue=queue)
        wait_for(lambda c=count: len([r for r in runs(rclient, "shop")  # type: ignore[misc]
                                      if r.trigger == "manual" and r.status == "succeeded"])
                 == c, 30, what="the sent run")

    every = cli(state, "run", "shop", "--all-instances", "--wait", env=env)
    assert every.returncode == 0, every.stderr
    assert f"host=host-a sha={c1} head={c1}" in every.stdout
    assert f"host=host-b sha={c2} head={c2}" in every.stdout
    manual = [r for r in runs(rclient, "shop") if r.trigger == "manual"]
    assert sorted((r.host, r.sha, r.status) for r in manual) == [
        ("host-a", c1, "succeeded"), *[("host-b", c2, "succeeded")] * 5]
    assert "forwarded to host-b" in a.worker.log() if a.worker else False


def test_status_lists_instances_and_a_waiting_run(
        fleet: Fleet, remote: GitRemote, rclient: redis.Redis, tmp_path: Path) -> None:
    remote.commit({"appspec.yaml": gated()}, "c1")
    a = add(fleet, "host-a")
    a.standin.mode = "502"
    a.start()
    env = cli_env(POSTDEPLOY_REDIS_URL=fleet.redis_url)
    table = wait_for(lambda: "waiting" in (out := cli(tmp_path / "cli", "status",
                                                      env=env).stdout) and out, 20,
                     what="status showing the waiting run")
    assert "shop@host-a" in table and "no (502)" in table
    started = time.monotonic()
    a.standin.mode = "serve"
    finished(rclient, 1)
    assert time.monotonic() - started < 10


def test_a_working_copy_that_moves_away_leaves_the_commit_to_a_host_that_has_it(
        fleet: Fleet, remote: GitRemote, rclient: redis.Redis) -> None:
    c1 = remote.commit({"appspec.yaml": gated()}, "c1")
    a, b = add(fleet, "host-a"), add(fleet, "host-b")
    a.start(), b.start()
    finished(rclient, 1)
    c2 = remote.commit({"appspec.yaml": gated(), "v": "2"}, "c2")
    b.pull()  # host-b's app keeps serving C1: its run of C2 waits
    wait_for(lambda: any(r.sha == c2 and r.status == "waiting" for r in runs(rclient, "shop")),
             20, what="the C2 run waiting on host-b")
    b.pull(c1)  # rolled back before its app ever served C2: a deployment of C1 again
    left = wait_for(lambda: next((r for r in runs(rclient, "shop")
                                  if r.sha == c2 and r.status == "superseded"), None), 20,
                    what="the C2 run given up on host-b")
    assert left.host == "host-b" and left.started_at is None
    assert left.deployment is not None
    assert not rclient.exists(keys.done("shop", left.deployment))  # not marked done
    back = wait_for(lambda: next((r for r in runs(rclient, "shop") if r.sha == c1
                                  and r.previous_sha == c2 and r.status == "succeeded"),
                                 None), 30, what="the rollback to C1 to run")
    assert back.deployment == left.deployment + 1
    a.pull(), a.serve()
    ran = wait_for(lambda: next((r for r in runs(rclient, "shop")
                                 if r.sha == c2 and r.status == "succeeded"), None), 30,
                   what="C2 to run on host-a")
    assert ran.host == "host-a"
    assert f"host=host-a sha={c2} head={c2}" in output_of(rclient, ran.id)


def test_a_cancelled_waiting_run_never_starts(
        fleet: Fleet, remote: GitRemote, rclient: redis.Redis, tmp_path: Path) -> None:
    remote.commit({"appspec.yaml": gated(POST_DEPLOY_SCOPE="instance")}, "c1")
    a = add(fleet, "host-a")
    a.standin.mode = "502"
    a.start()
    wait_for(lambda: any(r.status == "waiting" for r in runs(rclient, "shop")), 20,
             what="a waiting run")
    env = cli_env(POSTDEPLOY_REDIS_URL=fleet.redis_url)
    result = cli(tmp_path / "cli", "cancel", "shop", env=env)
    assert result.returncode == 0, result.stderr
    a.standin.mode = "serve"  # the app comes up: the cancelled run must not start anyway
    reports_after(rclient, [a], 4)
    (only,) = runs(rclient, "shop")
    assert (only.status, only.started_at) == ("cancelled", None)
    assert output_of(rclient, only.id) == ""


def test_scope_instance_for_a_repo_app_runs_in_each_hosts_own_checkout(
        fleet: Fleet, remote: GitRemote, rclient: redis.Redis,
        services: Callable[..., Service]) -> None:
    c1 = remote.commit({"appspec.yaml": spec(POST_DEPLOY_SCOPE="instance")}, "c1")
    a = fleet.add("host-a", kind="repo", extra_env={"HOST_LABEL": "host-a"})
    b = fleet.add("host-b", kind="repo", extra_env={"HOST_LABEL": "host-b"})
    a.start(), b.start()
    services("beat", a.env)  # the commit check (any host) learns the scope
    done = finished(rclient, 2)
    assert sorted((r.host, r.sha, r.status) for r in done) == [
        ("host-a", c1, "succeeded"), ("host-b", c1, "succeeded")]
    for run in done:  # each in the checkout of its own host
        assert f"host={run.host} sha={c1} head={c1}" in output_of(rclient, run.id)
    reports_after(rclient, [a, b], 3)
    assert len(runs(rclient, "shop")) == 2
