"""How git runs for the executor: credentials never stored in a clone, no code from the
clone's own git files, none of the executor's secrets in git's environment.

Real git processes on real repositories, served over HTTP with basic auth where
credentials matter.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from postdeploy.config.settings import AppConfig
from postdeploy.errors import GitError
from postdeploy.source import gitsafety
from postdeploy.source.git import AppSource
from postdeploy.source.gitsafety import RepoAccess
from tests.faults.harness import GitHttpServer, serve_dumb
from tests.support.core import GitRemote, appspec_yaml, run_git, wait_for

TOKEN = "tok-3f9c1d7e"


@pytest.fixture
def http(remote: GitRemote, tmp_path: Path) -> Iterator[GitHttpServer]:
    serve_dumb(remote)
    server = GitHttpServer(tmp_path / "git", accept=("deploy", TOKEN)).start()
    yield server
    server.stop()


def everything_under(directory: Path) -> bytes:
    return b"".join(p.read_bytes() for p in directory.rglob("*")
                    if p.is_file() and not p.is_symlink())


def test_token_is_never_written_into_the_clone(remote: GitRemote, http: GitHttpServer,
                                               tmp_path: Path) -> None:
    first = remote.commit({"appspec.yaml": appspec_yaml("true")})
    source = AppSource(AppConfig("shop", repo=http.url("shop.git", "deploy", TOKEN),
                                 branch="main"), tmp_path / "state")
    assert source.current_sha() == first  # ls-remote, through the helper
    workdir, _ = source.prepare(first)
    clean = http.url("shop.git")
    assert run_git(workdir, "config", "remote.origin.url").strip() == clean
    assert TOKEN.encode() not in everything_under(workdir / ".git")
    # New commits are still fetched with the credentials.
    second = remote.commit({"appspec.yaml": appspec_yaml("true"), "v": "2"})
    assert source.current_sha() == second
    assert source.prepare(second)[0] == workdir
    assert run_git(workdir, "rev-parse", "HEAD").strip() == second
    assert TOKEN.encode() not in everything_under(workdir / ".git")


def test_wrong_token_is_refused_with_one_line(remote: GitRemote, http: GitHttpServer,
                                              tmp_path: Path) -> None:
    remote.commit({"appspec.yaml": appspec_yaml("true")})
    source = AppSource(AppConfig("shop", repo=http.url("shop.git", "deploy", "wrong"),
                                 branch="main"), tmp_path / "state")
    with pytest.raises(GitError) as caught:
        source.current_sha()
    assert "wrong" not in str(caught.value) and "\n" not in str(caught.value)


def test_clone_made_with_a_token_url_is_repaired(remote: GitRemote, http: GitHttpServer,
                                                 tmp_path: Path) -> None:
    sha = remote.commit({"appspec.yaml": appspec_yaml("true")})
    with_token = http.url("shop.git", "deploy", TOKEN)
    clone = tmp_path / "state" / "checkouts" / "shop"
    clone.parent.mkdir(parents=True)
    run_git(clone.parent, "clone", "-q", "--no-checkout", with_token, str(clone))
    assert TOKEN in run_git(clone, "config", "remote.origin.url")  # as an old version left it
    source = AppSource(AppConfig("shop", repo=with_token, branch="main"), tmp_path / "state")
    source.prepare(sha)
    assert run_git(clone, "config", "remote.origin.url").strip() == http.url("shop.git")
    assert TOKEN.encode() not in everything_under(clone / ".git")


def test_credentials_go_to_the_repo_host_only(remote: GitRemote, http: GitHttpServer,
                                              tmp_path: Path) -> None:
    """A job that points the clone elsewhere (insteadOf) gets no token sent there."""
    sha = remote.commit({"appspec.yaml": appspec_yaml("true")})
    source = AppSource(AppConfig("shop", repo=http.url("shop.git", "deploy", TOKEN),
                                 branch="main"), tmp_path / "state")
    workdir, _ = source.prepare(sha)
    spy = GitHttpServer(tmp_path / "git", accept=("nobody", "x")).start()
    try:
        # Written straight into .git/config, as a job in the checkout could; our
        # rewrite of the config is what must undo it before the next fetch.
        with open(workdir / ".git" / "config", "a") as config:
            config.write(f'[url "{spy.url("")}"]\n\tinsteadOf = {http.url("")}\n')
        nxt = remote.commit({"appspec.yaml": appspec_yaml("true"), "v": "2"})
        source.prepare(nxt)
        assert spy.requests == 0
        assert "insteadof" not in (workdir / ".git" / "config").read_text().lower()
    finally:
        spy.stop()


def test_code_planted_in_the_clone_never_runs(remote: GitRemote, tmp_path: Path) -> None:
    """Hooks, hooksPath, fsmonitor, a smudge filter, a replaced .git: none of it runs."""
    first = remote.commit({"appspec.yaml": appspec_yaml("true"), "a.txt": "a"})
    source = AppSource(AppConfig("shop", repo=remote.url, branch="main"), tmp_path / "state")
    workdir, _ = source.prepare(first)
    marker = tmp_path / "ran"
    evil = tmp_path / "evil"
    evil.mkdir()
    for where in (workdir / ".git" / "hooks", evil):
        for hook in ("post-checkout", "reference-transaction", "post-index-change"):
            (where / hook).write_text(f"#!/bin/sh\necho {hook} >> {marker}\n")
            (where / hook).chmod(0o755)
    fsmonitor = evil / "fsmonitor"
    fsmonitor.write_text(f"#!/bin/sh\necho fsmonitor >> {marker}\n")
    fsmonitor.chmod(0o755)
    run_git(workdir, "config", "core.hooksPath", str(evil))
    run_git(workdir, "config", "core.fsmonitor", str(fsmonitor))
    run_git(workdir, "config", "filter.evil.smudge", f"sh -c 'echo smudge >> {marker}'; cat")
    (workdir / ".git" / "info").mkdir(exist_ok=True)
    (workdir / ".git" / "info" / "attributes").write_text("* filter=evil\n")
    second = remote.commit({"appspec.yaml": appspec_yaml("true"), "a.txt": "b"})
    source.prepare(second)
    assert not marker.exists(), marker.read_text()
    assert (workdir / "a.txt").read_text() == "b"
    # A job that replaces .git by a file pointing to its own git dir: cloned afresh.
    run_git(tmp_path, "init", "-q", str(tmp_path / "fake"))
    run_git(tmp_path / "fake", "config", "core.hooksPath", str(evil))
    subprocess.run(["rm", "-rf", str(workdir / ".git")], check=True)
    (workdir / ".git").write_text(f"gitdir: {tmp_path / 'fake' / '.git'}\n")
    third = remote.commit({"appspec.yaml": appspec_yaml("true"), "a.txt": "c"})
    source.prepare(third)
    assert not marker.exists(), marker.read_text()
    assert (workdir / ".git").is_dir()
    assert run_git(workdir, "rev-parse", "HEAD").strip() == third


def test_git_gets_none_of_the_executors_secrets(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """git's environment, as an ssh command (allowed through: an operator's deploy key)
    sees it: the allow-listed part only."""
    seen = tmp_path / "ssh-env"
    ssh = tmp_path / "fake-ssh"
    ssh.write_text(f"#!/bin/sh\nenv > {seen}\nexit 1\n")
    ssh.chmod(0o755)
    monkeypatch.setenv("GIT_SSH_COMMAND", str(ssh))
    monkeypatch.setenv("POSTDEPLOY_REDIS_URL", "redis://:redis-pw-77@127.0.0.1:1/0")
    monkeypatch.setenv("FLOWER_BASIC_AUTH", "ops:flower-pw-77")
    monkeypatch.setenv("SOME_API_KEY", "api-key-77")
    source = AppSource(AppConfig("shop", repo="ssh://git@git.invalid/acme/shop.git"),
                       tmp_path / "state")
    with pytest.raises(GitError):
        source.current_sha()
    env = seen.read_text()
    assert "PATH=" in env
    for secret in ("redis-pw-77", "flower-pw-77", "api-key-77", "POSTDEPLOY_", "FLOWER_"):
        assert secret not in env, secret
    assert os.environ["POSTDEPLOY_REDIS_URL"]  # it was there to leak


def test_operators_own_credential_helper_still_works(
        remote: GitRemote, http: GitHttpServer, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A helper in the executor's global git config (a URL without a token) is kept;
    a helper the repo's config names is not run."""
    sha = remote.commit({"appspec.yaml": appspec_yaml("true")})
    marker = tmp_path / "repo-helper-ran"
    global_config = tmp_path / "gitconfig"
    global_config.write_text(
        f'[credential "{http.url("")}"]\n'
        f"\thelper = \"!f() {{ echo username=deploy; echo password={TOKEN}; }}; f\"\n")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(global_config))
    monkeypatch.setattr(gitsafety, "_operator_helpers", None)  # read per process
    source = AppSource(AppConfig("shop", repo=http.url("shop.git"), branch="main"),
                       tmp_path / "state")
    assert source.current_sha() == sha
    workdir, _ = source.prepare(sha)
    # A helper planted in the clone's config (and not yet undone by our rewrite of it),
    # on a command that needs credentials: never run.
    run_git(workdir, "config", "credential.helper", f"!touch {marker}")
    planted = RepoAccess(http.url("shop.git"))
    env = planted.environment(dict(os.environ))
    done = subprocess.run(
        ["git", *planted.config_args(), "ls-remote", http.url("shop.git")],
        cwd=workdir, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert not marker.exists()


def test_a_git_host_that_never_answers_ends_at_the_timeout(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ref lookup is bounded: one line when it runs out, and neither git nor the
    helper it started for HTTP is left running."""
    import socket
    import time

    import psutil

    from postdeploy.source import git as gitsource

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts connections, never answers
    monkeypatch.setattr(gitsource, "LS_REMOTE_TIMEOUT", 1.5)
    port = silent.getsockname()[1]
    source = AppSource(AppConfig("shop", repo=f"http://127.0.0.1:{port}/shop.git"),
                       tmp_path / "state")

    def for_that_host(proc: psutil.Process) -> bool:  # git, or a helper it started
        try:
            return (proc.status() != psutil.STATUS_ZOMBIE
                    and str(port) in " ".join(proc.cmdline()))
        except psutil.Error:
            return False  # gone meanwhile

    started = time.monotonic()
    try:
        with pytest.raises(GitError, match=r"^git ls-remote timed out after 1.5 s") as info:
            source.current_sha()
        assert time.monotonic() - started < 5
        assert "\n" not in str(info.value)
        # Anywhere on the machine (a helper left behind is an orphan), while the host is
        # still silent: closing the socket would end a leftover by itself. SIGKILLed
        # processes take a moment to go.
        wait_for(lambda: not [p for p in psutil.process_iter() if for_that_host(p)], 3,
                 what="git and its helpers to be gone")
    finally:
        silent.close()


def test_git_output_and_exit_status_are_collected_whatever_their_order(tmp_path: Path) -> None:
    from postdeploy.source.git import _run

    done = _run(["sh", "-c", "printf out; printf err >&2; exit 3"], tmp_path, {}, 5)
    assert (done.returncode, done.stdout, done.stderr) == (3, b"out", b"err")
    big = _run(["sh", "-c", "head -c 300000 /dev/zero; head -c 200000 /dev/zero >&2"],
               None, {}, 5)
    assert (len(big.stdout), len(big.stderr), big.returncode) == (300000, 200000, 0)
    with pytest.raises(subprocess.TimeoutExpired):  # output closed, then it hangs
        _run(["sh", "-c", "exec >/dev/null 2>&1; sleep 30"], None, {}, 0.5)
