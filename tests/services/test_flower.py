"""Flower on postdeploy: basic auth, run_job visible with app and commit, re-runs
through its API recorded as manual, and a real browser finding the run."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from postdeploy.store import keys
from tests.support.core import (
    REPO_ROOT,
    GitRemote,
    RedisServer,
    Service,
    appspec_yaml,
    finished_runs,
    free_port,
    service_env,
    wait_for,
)

USER, PASSWORD = "ops", "s3cret-pw"
INTERVAL = 1.0  # seconds between commit checks: the shortest allowed
CHECKS = 4  # intervals to let pass before looking for check rows in Flower
OUTPUT_DIR = REPO_ROOT / "test-output"


@dataclass
class Stack:
    """Flower, a worker and beat on one Redis; the demo app's auto run has finished."""

    port: int
    client: redis.Redis
    env: dict[str, str]
    good_sha: str  # HEAD: its job succeeds
    bad_sha: str  # an older commit whose job exits 3
    flower: Service

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def request(url: str, auth: tuple[str, str] | None = (USER, PASSWORD),
            body: dict[str, Any] | None = None) -> tuple[int, Any]:
    """(status, parsed JSON or text) of a GET, or of a POST when ``body`` is given."""
    headers = {"Content-Type": "application/json"}
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            text = resp.read().decode()
            status = resp.status
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def answers(url: str) -> bool:
    try:
        return request(url, auth=None)[0] == 200
    except (urllib.error.URLError, ConnectionError):
        return False


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("flower")
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    remote = GitRemote(root / "git")
    bad = remote.commit({"appspec.yaml": appspec_yaml("echo about to fail; exit 3")}, "bad")
    good = remote.commit({"appspec.yaml": appspec_yaml("echo seeded $COMMIT_SHA")}, "good")
    blog = GitRemote(root / "blog-git", name="blog")
    blog.commit({"appspec.yaml": appspec_yaml("echo blog ready")}, "blog")
    config = root / "postdeploy.yaml"
    config.write_text(f"apps:\n  - name: shop\n    repo: {remote.url}\n"
                      f"  - name: blog\n    repo: {blog.url}\n")
    # Two apps checked every INTERVAL: each check must stay out of Flower's task list.
    env = service_env(redis_server.url, root / "state", interval=INTERVAL,
                      POSTDEPLOY_CONFIG=str(config), FLOWER_BASIC_AUTH=f"{USER}:{PASSWORD}")
    port = free_port()
    flower = Service(["-m", "postdeploy.cli", "flower", "--address", "127.0.0.1",
                      "--port", str(port)], env, root / "flower.log")
    started = [flower]
    try:
        wait_for(lambda: answers(f"http://127.0.0.1:{port}/healthcheck")
                 or not flower.alive(), 30, what="Flower to answer")
        assert flower.alive(), flower.log()
        # Task events are broadcast, not queued: Flower must listen before the worker runs.
        wait_for(lambda: "Connected to redis" in flower.log(), 30, what="Flower's event consumer")
        started.append(Service(["-m", "worker"], env, root / "worker.log"))
        started.append(Service(["-m", "beat"], env, root / "beat.log"))
        wait_for(lambda: any(r.sha == good and r.status == "succeeded"
                             for r in finished_runs(client, "shop")),
                 60, what="the automatic run of the demo commit")
        yield Stack(port, client, env, good, bad, flower)
    finally:
        for service in reversed(started):
            service.stop()
    # Flower saved its task list in the state dir (--persistent) on a clean stop.
    assert list((root / "state").glob("flower.db*")), "no flower.db in the state dir"


def flower_task(stack: Stack, task_id: str) -> dict[str, Any] | None:
    status, info = request(f"{stack.base}/api/task/info/{task_id}")
    return info if status == 200 and isinstance(info, dict) else None


def finished_task(stack: Stack, task_id: str) -> dict[str, Any]:
    return wait_for(lambda: (t := flower_task(stack, task_id))
                    and t.get("state") in ("SUCCESS", "FAILURE") and t,
                    60, what=f"Flower to see task {task_id} finish")


def let_checks_pass(stack: Stack) -> None:
    """Wait until beat's check has run CHECKS more times (Flower must not list them)."""
    def checked_at() -> float:
        return float(stack.client.get(keys.checked_at("shop")) or 0)

    start = checked_at()
    wait_for(lambda: checked_at() >= start + CHECKS * INTERVAL, 30 + CHECKS * INTERVAL,
             what=f"{CHECKS} more commit checks")


def test_flower_lists_runs_and_manual_checks_but_not_periodic_checks(stack: Stack) -> None:
    wait_for(lambda: finished_runs(stack.client, "blog"), 60, what="blog's automatic run")
    let_checks_pass(stack)
    status, tasks = request(f"{stack.base}/api/tasks")
    assert status == 200
    names = Counter(str(t.get("name")) for t in tasks.values())
    assert names["postdeploy.check_commits"] == 0 and names["postdeploy.check_apps"] == 0, names
    assert not [t for t in tasks.values() if t.get("state") == "PENDING"], tasks
    runs = [t for t in tasks.values() if t.get("name") == "postdeploy.run_job"]
    assert {"shop", "blog"} <= {a for t in runs for a in ("shop", "blog")
                                if f"'app': '{a}'" in str(t.get("kwargs"))}
    # The manual check is an operator's action: Flower shows it, with its result.
    done = subprocess.run([sys.executable, "-m", "postdeploy.cli", "check", "blog"],
                          env=stack.env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    check = wait_for(lambda: next((t for t in request(f"{stack.base}/api/tasks")[1].values()
                                   if t.get("name") == "postdeploy.check_app"
                                   and t.get("state") == "SUCCESS"), None),
                     30, what="Flower to list the manual check_app")
    assert "blog" in str(check.get("args")) and "blog" in str(check.get("result"))


def test_flower_asks_for_basic_auth(stack: Stack) -> None:
    assert request(f"{stack.base}/api/workers", auth=None)[0] == 401
    assert request(f"{stack.base}/api/workers", auth=(USER, "wrong"))[0] == 401
    assert request(f"{stack.base}/tasks", auth=None)[0] == 401
    status, workers = request(f"{stack.base}/api/workers")
    assert status == 200 and isinstance(workers, dict)
    status, types = request(f"{stack.base}/api/task/types")
    assert status == 200 and "postdeploy.run_job" in types["task-types"]


def test_flower_lists_run_job_with_app_and_commit(stack: Stack) -> None:
    def auto_run() -> dict[str, Any] | None:
        status, tasks = request(f"{stack.base}/api/tasks?taskname=postdeploy.run_job")
        if status != 200:
            return None
        return next((t for t in tasks.values()
                     if stack.good_sha in str(t.get("kwargs")) and t.get("state") == "SUCCESS"),
                    None)

    task = wait_for(auto_run, 30, what="Flower to list the automatic run_job")
    assert "'app': 'shop'" in task["kwargs"] and "'trigger': 'auto'" in task["kwargs"]
    assert stack.good_sha in str(task["result"]) and "succeeded" in str(task["result"])


def test_async_apply_reruns_the_job_as_manual(stack: Stack) -> None:
    before = {r.id for r in finished_runs(stack.client, "shop")}
    status, answer = request(f"{stack.base}/api/task/async-apply/postdeploy.run_job",
                             body={"kwargs": {"app": "shop"}})
    assert status == 200, answer
    run = wait_for(lambda: next((r for r in finished_runs(stack.client, "shop")
                                 if r.id not in before), None),
                   60, what="the manual run to be recorded")
    # No sha given: the app's last seen commit; recorded as a manual run.
    assert (run.trigger, run.sha, run.status) == ("manual", stack.good_sha, "succeeded")
    task = finished_task(stack, answer["task-id"])
    assert task["state"] == "SUCCESS"
    assert "'app': 'shop'" in task["kwargs"]
    assert stack.good_sha in str(task["result"]) and "manual" in str(task["result"])


def test_failed_job_is_a_flower_failure_with_the_reason(stack: Stack) -> None:
    status, answer = request(f"{stack.base}/api/task/async-apply/postdeploy.run_job",
                             body={"kwargs": {"app": "shop", "sha": stack.bad_sha}})
    assert status == 200, answer
    task = finished_task(stack, answer["task-id"])
    assert task["state"] == "FAILURE"
    assert "JobFailed" in task["exception"] and f"shop@{stack.bad_sha[:7]}" in task["exception"]
    assert "exit" in task["exception"] and "3" in task["exception"]
    run = wait_for(lambda: next((r for r in finished_runs(stack.client, "shop")
                                 if r.sha == stack.bad_sha), None), 30, what="the failed run")
    assert (run.trigger, run.status, run.exit_code) == ("manual", "failed", 3)


def test_browser_logs_in_and_finds_the_run(stack: Stack) -> None:
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        pytest.skip("Debian's chromium and chromium-driver are not installed "
                    "(.ci/run installs them)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is a test extra")
    from selenium.webdriver.common.by import By

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    profile = OUTPUT_DIR / "chromium-profile"
    shutil.rmtree(profile, ignore_errors=True)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 "--window-size=1600,900", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path),
                               options=options)
    try:
        # Basic auth the way a person's browser sends it once logged in: on every request.
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        browser.execute_cdp_cmd("Network.enable", {})
        browser.execute_cdp_cmd("Network.setExtraHTTPHeaders",
                                {"headers": {"Authorization": f"Basic {token}"}})
        browser.get(f"{stack.base}/tasks")
        sha7 = stack.good_sha[:7]
        row = wait_for(lambda: next((r for r in browser.find_elements(By.CSS_SELECTOR,
                                                                      "table tbody tr")
                                     if stack.good_sha in r.text and "SUCCESS" in r.text),
                                    None),
                       30, what=f"a SUCCESS run_job row for {sha7} on the tasks page")
        assert "postdeploy.run_job" in row.text and "shop" in row.text
        # Several check intervals later the page still shows runs, and no check rows.
        let_checks_pass(stack)
        browser.refresh()
        wait_for(lambda: any(stack.good_sha in r.text for r in
                             browser.find_elements(By.CSS_SELECTOR, "table tbody tr")),
                 30, what="the run_job row after a reload")
        rows = [r.text for r in browser.find_elements(By.CSS_SELECTOR, "table tbody tr")]
        assert not [r for r in rows if "check_commits" in r or "PENDING" in r], rows
        OUTPUT_DIR.mkdir(exist_ok=True)
        shot = OUTPUT_DIR / "flower-tasks.png"
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
    finally:
        browser.quit()
        shutil.rmtree(profile, ignore_errors=True)


def run_flower(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "postdeploy.cli", "flower", *args], env=env,
                          capture_output=True, text=True, timeout=60)


def test_flower_refuses_open_address_without_auth(tmp_path: Path) -> None:
    env = service_env("redis://127.0.0.1:1/0", tmp_path / "state")
    env.pop("FLOWER_BASIC_AUTH", None)
    proc = run_flower(env, "--address", "0.0.0.0", "--port", str(free_port()))
    assert proc.returncode == 2
    assert proc.stderr.startswith("postdeploy: error: refusing to serve Flower on 0.0.0.0")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_flower_bad_auth_setting_is_one_line_without_the_secret(tmp_path: Path) -> None:
    env = service_env("redis://127.0.0.1:1/0", tmp_path / "state",
                      FLOWER_BASIC_AUTH="ops:pw,justaname-secret")
    proc = run_flower(env)
    assert proc.returncode == 2
    assert "FLOWER_BASIC_AUTH: entry 2 is not user:password" in proc.stderr
    assert "justaname-secret" not in proc.stderr and "pw" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
