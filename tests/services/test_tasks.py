"""End to end: real redis-server, real prefork worker and beat, real git repositories."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

import psutil
import redis
from celery import Celery

from postdeploy.config.settings import Settings
from postdeploy.run.runner import job_processes
from postdeploy.store import keys
from postdeploy.store.celery_app import configure
from postdeploy.store.records import RunRecord
from postdeploy.store.state import StateStore
from tests.support.core import (
    GitRemote,
    Service,
    appspec_yaml,
    finished_runs,
    output_of,
    process_alive,
    runs,
    service_env,
    wait_for,
)

Start = Callable[..., Service]
EnvFor = Callable[..., dict[str, str]]


def wait_finished(client: redis.Redis, count: int, timeout: float = 40) -> list[RunRecord]:
    return wait_for(lambda: (r := finished_runs(client, "shop")) and len(r) >= count and r,
                    timeout, what=f"{count} finished run(s)")


def wait_checks(client: redis.Redis, count: int) -> None:
    """Wait until ``count`` more commit checks of the app have completed."""
    store = StateStore(client)
    for _ in range(count):
        before = store.checked_at("shop") or 0.0
        wait_for(lambda b=before: (store.checked_at("shop") or 0.0) > b, 20,  # type: ignore[misc]
                 what="a check")


def start_pair(services: Start, env: dict[str, str], tag: str = "") -> tuple[Service, Service]:
    return services("worker", env, f"worker{tag}"), services("beat", env, f"beat{tag}")


def task_states(client: redis.Redis) -> list[dict[str, object]]:
    metas = client.keys(f"{keys.CELERY_PREFIX}celery-task-meta-*")
    return [json.loads(client.get(k) or b"{}") for k in metas]


def test_runs_once_per_commit_and_survives_restarts(
        remote: GitRemote, rclient: redis.Redis, services: Start, env_for: EnvFor,
        tmp_path: Path) -> None:
    sha1 = remote.commit({
        "appspec.yaml": appspec_yaml("bash job.sh", folder="scripts", envs={"GREETING": "hi"},
                                     secrets={"API_TOKEN": "tok-123"}),
        "scripts/job.sh": 'echo "sha=$COMMIT_SHA greet=$GREETING app=$POST_DEPLOY_APP '
                          'trigger=$POST_DEPLOY_TRIGGER token=$API_TOKEN"\n'
                          # The guide's notification example asks git about the deploy.
                          'echo "head=$(git rev-parse HEAD) msg=$(git log -1 --pretty=%B)"\n'},
        "first deploy")
    env = env_for(remote)
    worker, beat = start_pair(services, env)

    first = wait_finished(rclient, 1)[0]
    assert (first.sha, first.status, first.trigger, first.exit_code) == (
        sha1, "succeeded", "auto", 0)
    out = output_of(rclient, first.id)
    assert f"sha={sha1} greet=hi app=shop trigger=auto token=***" in out
    assert f"head={sha1} msg=first deploy" in out
    assert "tok-123" not in worker.log()
    assert f"[POST-DEPLOY] shop@{sha1[:7]} | sha={sha1}" in worker.log()

    # Several intervals with no new commit, then a restart of both: nothing runs again.
    wait_checks(rclient, 3)
    worker.stop()
    beat.stop()
    worker, beat = start_pair(services, env, "-restarted")
    wait_for(lambda: "ready." in worker.log(), 20, what="restarted worker")
    wait_checks(rclient, 4)
    assert len(runs(rclient, "shop")) == 1

    # A new commit that changes the command: exactly one run, of the new command.
    sha2 = remote.commit({"appspec.yaml": appspec_yaml("echo new-command-$COMMIT_SHA")})
    second = wait_finished(rclient, 2)[1]
    assert (second.sha, second.status) == (sha2, "succeeded")
    assert f"new-command-{sha2}" in output_of(rclient, second.id)
    wait_checks(rclient, 3)
    assert len(runs(rclient, "shop")) == 2


def test_failure_is_lenient(remote: GitRemote, rclient: redis.Redis, services: Start,
                            env_for: EnvFor) -> None:
    remote.commit({"appspec.yaml": appspec_yaml("echo failing; exit 3")})
    worker, _ = start_pair(services, env_for(remote))
    failed = wait_finished(rclient, 1)[0]
    assert (failed.status, failed.exit_code, failed.reason) == ("failed", 3,
                                                                "exited with code 3")
    wait_for(lambda: "WARNING" in worker.log() and "exited with code 3" in worker.log(), 10,
             what="a WARNING naming the reason")
    states = wait_for(lambda: [s for s in task_states(rclient) if s.get("name") ==
                               "postdeploy.run_job" and s.get("status") == "FAILURE"], 10,
                      what="the run_job task stored as FAILURE")
    assert "exited with code 3" in json.dumps(states[0]["result"])

    sha2 = remote.commit({"appspec.yaml": appspec_yaml("echo fixed")})
    second = wait_finished(rclient, 2)[1]
    assert (second.sha, second.status) == (sha2, "succeeded")
    assert len(runs(rclient, "shop")) == 2  # the failure was not retried
    assert worker.alive()


def test_timeout_stops_every_process_of_the_job(
        remote: GitRemote, rclient: redis.Redis, services: Start, env_for: EnvFor,
        tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild.pid"
    remote.commit({"appspec.yaml": appspec_yaml(
        f"bash -c 'sleep 1000 & echo $! > {pidfile}; wait'", timeout="2")})
    worker, _ = start_pair(services, env_for(remote))
    record = wait_for(lambda: (r := runs(rclient, "shop")) and r[0].started_at and r[0], 30,
                      what="the run to start")
    done = wait_finished(rclient, 1, timeout=2 + 2 + 10)[0]
    assert done.status == "timed_out"
    assert done.finished_at and done.started_at
    assert done.finished_at - done.started_at < 2 + 2 + 3  # timeout + grace + a few
    assert "timed out after 2 s" in (done.reason or "")
    grandchild = int(pidfile.read_text())
    assert not process_alive(grandchild)
    assert job_processes(record.id) == []
    assert worker.alive()


def test_daemon_left_by_a_job_lives_and_does_not_block(
        remote: GitRemote, rclient: redis.Redis, services: Start, env_for: EnvFor,
        tmp_path: Path) -> None:
    pidfile = tmp_path / "daemon.pid"
    remote.commit({"appspec.yaml": appspec_yaml(
        f"nohup sleep 300 & echo $! > {pidfile}; echo workers started")})
    start_pair(services, env_for(remote))
    first = wait_finished(rclient, 1)[0]
    assert first.status == "succeeded"
    assert first.finished_at and first.started_at and first.finished_at - first.started_at < 5
    daemon = int(pidfile.read_text())
    try:
        assert process_alive(daemon)
        sha2 = remote.commit({"appspec.yaml": appspec_yaml("echo next")})
        second = wait_finished(rclient, 2)[1]
        assert (second.sha, second.status) == (sha2, "succeeded")
    finally:
        os.kill(daemon, signal.SIGKILL)


def test_bad_appspec_outcomes_keep_the_service_running(
        remote: GitRemote, rclient: redis.Redis, services: Start, env_for: EnvFor) -> None:
    worker, _ = start_pair(services, env_for(remote))
    cases = [
        ("envs: [unclosed", "error", "invalid YAML"),
        (appspec_yaml("true", folder="../.."), "error", "POST_DEPLOY_FOLDER"),
        (appspec_yaml("true", folder="/etc"), "error", "absolute"),
        (appspec_yaml("echo ran", timeout="abc"), "succeeded", None),
        (appspec_yaml("echo ran", timeout="0"), "succeeded", None),
    ]
    for index, (text, status, reason) in enumerate(cases, start=1):
        sha = remote.commit({"appspec.yaml": text}, f"case {index}")
        record = wait_finished(rclient, index)[index - 1]
        assert (record.sha, record.status) == (sha, status), text
        if reason:
            assert reason in (record.reason or ""), record.reason
        else:
            assert record.timeout == 300
    assert "invalid POST_DEPLOY_TIMEOUT: 'abc' is not a positive integer" in worker.log()
    assert worker.alive()


def test_fleet_runs_each_commit_at_most_once(
        remote: GitRemote, rclient: redis.Redis, services: Start, env_for: EnvFor) -> None:
    job = "echo start; sleep 0.5; echo end"
    remote.commit({"appspec.yaml": appspec_yaml(job)}, "c0")
    env = env_for(remote, interval=1.0)  # the shortest interval allowed
    for tag in ("a", "b"):
        start_pair(services, env, tag)
    shas = [remote.head()]
    for i in range(1, 6):
        wait_for(lambda: rclient.get(keys.last_seen("shop")) == shas[-1].encode(), 20,
                 what="the commit to be seen")
        shas.append(remote.commit({"appspec.yaml": appspec_yaml(job), "n": str(i)}, f"c{i}"))
    wait_for(lambda: any(r.sha == shas[-1] and r.status == "succeeded"
                         for r in runs(rclient, "shop")), 40, what="the latest commit's run")
    executed = [r for r in runs(rclient, "shop") if r.started_at and r.status != "superseded"]
    per_sha = [sum(1 for r in executed if r.sha == s) for s in shas]
    assert all(n <= 1 for n in per_sha), per_sha
    spans = sorted((r.started_at or 0, r.finished_at or 0) for r in executed)
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert start >= end, "two runs of one app overlapped"


def test_path_app_runs_in_place_and_many_apps_from_config(
        remote: GitRemote, rclient: redis.Redis, services: Start, redis_url: str,
        state_dir: Path, tmp_path: Path) -> None:
    """A `path` app runs in its own working copy; apps come from postdeploy.yaml."""
    remote.commit({"appspec.yaml": appspec_yaml("echo shop-ran")})
    blog = GitRemote(tmp_path / "blog-git", "blog")
    blog_sha = blog.commit({"appspec.yaml": appspec_yaml("pwd; echo blog-ran")})
    config = tmp_path / "postdeploy.yaml"
    config.write_text(f"apps:\n  - name: shop\n    repo: {remote.url}\n"
                      f"  - name: blog\n    path: {blog.work}\n")
    env = service_env(redis_url, state_dir, 1.0, POSTDEPLOY_CONFIG=str(config))
    start_pair(services, env)
    wait_finished(rclient, 1)
    record = wait_for(lambda: finished_runs(rclient, "blog"), 40, what="the blog run")[0]
    assert (record.sha, record.status) == (blog_sha, "succeeded")
    assert output_of(rclient, record.id).splitlines() == [str(blog.work.resolve()), "blog-ran"]


def test_long_lived_worker_leaks_no_git_processes(
        remote: GitRemote, rclient: redis.Redis, services: Start, env_for: EnvFor) -> None:
    remote.commit({"appspec.yaml": appspec_yaml("echo one")})
    worker, _ = start_pair(services, env_for(remote))
    wait_finished(rclient, 1)
    remote.commit({"appspec.yaml": appspec_yaml("echo two")})
    wait_finished(rclient, 2)
    wait_checks(rclient, 2)
    tree = psutil.Process(worker.proc.pid).children(recursive=True)
    git_children = [p.cmdline() for p in tree if p.name() == "git"]
    assert git_children == []


def celery_for(env: dict[str, str]) -> Celery:
    """This test process's handle on the workers' Celery app, as Flower has."""
    return configure(Settings.load(env), env["POSTDEPLOY_REDIS_URL"])


def pool_pids(worker: Service) -> set[int]:
    return {p.pid for p in psutil.Process(worker.proc.pid).children()}


def test_run_sent_without_a_time_limit_still_ends_at_its_timeout(
        remote: GitRemote, rclient: redis.Redis, services: Start, env_for: EnvFor) -> None:
    """Flower's async-apply with only kwargs: no soft limit on the message."""
    remote.commit({"appspec.yaml": appspec_yaml("echo started; sleep 300", timeout="2")})
    env = env_for(remote)
    services("worker", env)  # no beat: the run is sent by hand
    from postdeploy.services.tasks import run_job
    celery_for(env)
    result = run_job.apply_async(kwargs={"app": "shop", "sha": remote.head()})
    done = wait_finished(rclient, 1, timeout=30)[0]
    assert (done.status, done.trigger, done.task_id) == ("timed_out", "manual", result.id)
    assert done.reason == "timed out after 2 s (POST_DEPLOY_TIMEOUT)"
    assert done.finished_at and done.started_at
    # The clock runs from the task's start: 2 s, then at most the 2 s grace and a little.
    assert done.finished_at - done.started_at < 2 + 2 + 2
    assert job_processes(done.id) == []


def test_revoke_from_flower_cancels_a_waiting_and_a_running_run(
        remote: GitRemote, rclient: redis.Redis, services: Start, env_for: EnvFor) -> None:
    remote.commit({"appspec.yaml": appspec_yaml("echo started; sleep 300", timeout="600")})
    env = env_for(remote)
    worker = services("worker", env)
    wait_for(lambda: "ready." in worker.log(), 20, what="the worker")
    pools = pool_pids(worker)
    from postdeploy.services.tasks import run_job
    celery = celery_for(env)
    sha = remote.head()
    first = run_job.apply_async(kwargs={"app": "shop", "sha": sha})
    running = wait_for(lambda: next((r for r in runs(rclient, "shop")
                                     if r.task_id == first.id and r.status == "running"
                                     and "started" in output_of(rclient, r.id)), None), 30,
                       what="the first run to start")
    # The second waits for the app's lock (retrying with a countdown): revoke it there.
    second = run_job.apply_async(kwargs={"app": "shop", "sha": sha})
    wait_for(lambda: len(runs(rclient, "shop")) == 2, 20, what="the second run's record")
    celery.control.revoke(second.id)
    celery.control.revoke(first.id, terminate=True)

    cancelled = wait_for(lambda: (r := finished_runs(rclient, "shop")) and len(r) == 2 and r,
                         20, what="both runs to end")
    assert [(r.id, r.status) for r in cancelled] == [(running.id, "cancelled"),
                                                      (cancelled[1].id, "cancelled")]
    assert "terminated" in (cancelled[0].reason or "")
    assert "before it started" in (cancelled[1].reason or "")
    assert cancelled[1].started_at is None
    wait_for(lambda: job_processes(running.id) == [], 10, what="the job's processes to stop")
    # The pool process took SIGTERM as a stop request and lives on to run the next job.
    assert pool_pids(worker) == pools and worker.alive()
    assert len(runs(rclient, "shop")) == 2  # a retried message did not add records
    third = run_job.apply_async(kwargs={"app": "shop", "sha": sha, "trigger": "manual"})
    wait_for(lambda: any(r.task_id == third.id and r.status == "running"
                         for r in runs(rclient, "shop")), 20, what="a third run to start")
    assert pool_pids(worker) == pools
    celery.control.revoke(third.id, terminate=True)
    wait_for(lambda: len(finished_runs(rclient, "shop")) == 3, 20, what="the third run's end")


def pool_process_of(job_pid: int, worker: Service) -> int:
    """The worker's pool process running a job (the job's guard sits in between)."""
    proc = psutil.Process(job_pid)
    while proc.ppid() != worker.proc.pid:
        parent = proc.parent()
        assert parent is not None, "the job is not below the worker"
        proc = parent
    return proc.pid


def test_sigterm_to_the_pool_process_that_is_no_revoke_loses_the_run_and_reruns_it(
        remote: GitRemote, rclient: redis.Redis, services: Start, env_for: EnvFor) -> None:
    """As when the worker is stopped outright: the run is lost, and its commit runs again."""
    sha = remote.commit({"appspec.yaml": appspec_yaml("echo started; sleep 3")})
    worker, _ = start_pair(services, env_for(remote))
    first = wait_for(lambda: next((r for r in runs(rclient, "shop") if r.status == "running"
                                   and "started" in output_of(rclient, r.id)), None), 30,
                     what="the job to start")
    job_pid = wait_for(lambda: job_processes(first.id), 10, what="the job's process")[0]
    pool = pool_process_of(job_pid, worker)
    os.kill(pool, signal.SIGTERM)
    wait_for(lambda: not process_alive(pool), 15, what="the pool process to end")
    done = wait_finished(rclient, 2, timeout=40)
    assert [(r.id, r.sha, r.status) for r in done] == [(first.id, sha, "lost"),
                                                        (done[1].id, sha, "succeeded")]
    assert done[0].reason == "its worker was shut down mid-run; the deployment is run again"
    assert job_processes(first.id) == []
    assert worker.alive()


def test_the_messages_soft_time_limit_is_the_one_clock(
        remote: GitRemote, rclient: redis.Redis, services: Start, env_for: EnvFor) -> None:
    """Celery's soft limit stops the job, even below the appspec's timeout: no second timer."""
    remote.commit({"appspec.yaml": appspec_yaml("echo started; sleep 300", timeout="60")})
    env = env_for(remote)
    worker = services("worker", env)
    from postdeploy.services.tasks import run_job
    celery_for(env)
    run_job.apply_async(kwargs={"app": "shop", "sha": remote.head()}, soft_time_limit=2,
                        time_limit=30)
    done = wait_finished(rclient, 1, timeout=30)[0]
    assert (done.status, done.reason) == ("timed_out",
                                          "timed out after 2 s (POST_DEPLOY_TIMEOUT)")
    assert done.timeout == 60  # what the appspec says; the message's limit ruled
    assert done.finished_at and done.started_at and done.finished_at - done.started_at < 6
    assert job_processes(done.id) == []
    assert "Soft time limit (2s) exceeded" in worker.log() and worker.alive()
