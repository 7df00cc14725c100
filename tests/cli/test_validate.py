"""`postdeploy validate` through the real CLI, on real git repositories (no Redis needed)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tests.support.clirun import cli
from tests.support.core import REPO_ROOT, appspec_yaml, run_git

SCRIPT = "scripts/post-deploy/seed.sh"


def app_repo(root: Path, folder: str = "scripts/post-deploy",
             command: str = "bash seed.sh") -> Path:
    repo = root / "app"
    (repo / "scripts" / "post-deploy").mkdir(parents=True)
    (repo / SCRIPT).write_text("echo hi\n")
    (repo / "appspec.yaml").write_text(appspec_yaml(command=command, folder=folder))
    run_git(repo, "init", "-q")
    return repo


def commit_all(repo: Path) -> None:
    run_git(repo, "add", "-A")
    run_git(repo, "commit", "-q", "-m", "change")


def test_validate_accepts_the_demo_app(tmp_path: Path) -> None:
    repo = tmp_path / "demo"
    shutil.copytree(REPO_ROOT / "examples" / "demo-app", repo)
    result = cli(tmp_path, "validate", str(repo))
    assert result.returncode == 0, result.stdout
    assert "0 error(s)" in result.stdout


def test_validate_rejects_a_folder_that_escapes_the_repo(tmp_path: Path) -> None:
    repo = app_repo(tmp_path, folder="outside")
    os.symlink(tmp_path, repo / "outside")
    result = cli(tmp_path, "validate", str(repo))
    assert result.returncode == 1
    assert "error: POST_DEPLOY_FOLDER 'outside' leads out of the repository" in result.stdout

    (repo / "appspec.yaml").write_text(appspec_yaml(command="bash seed.sh", folder="../x"))
    result = cli(tmp_path, "validate", str(repo))
    assert result.returncode == 1 and "leaves the repository" in result.stdout


def test_validate_names_a_missing_script_and_a_bad_timeout(tmp_path: Path) -> None:
    repo = app_repo(tmp_path, command="bash missing.sh")
    (repo / "appspec.yaml").write_text(appspec_yaml(command="bash missing.sh",
                                                    folder="scripts/post-deploy",
                                                    timeout="5m"))
    result = cli(tmp_path, "validate", str(repo))
    assert result.returncode == 1
    assert "error: script scripts/post-deploy/missing.sh does not exist" in result.stdout
    assert "warning: invalid POST_DEPLOY_TIMEOUT: '5m'" in result.stdout


def test_validate_without_a_command(tmp_path: Path) -> None:
    repo = app_repo(tmp_path)
    (repo / "appspec.yaml").write_text("envs: []\n")
    result = cli(tmp_path, "validate", str(repo))
    assert result.returncode == 1 and "POST_DEPLOY_COMMAND is not set" in result.stdout


def test_validate_reads_the_x_bit_of_the_commit_not_of_the_working_copy(
        tmp_path: Path) -> None:
    # core.fileMode false (Windows checkouts, some shared folders): git ignores the
    # working copy's x bit, so a script can be executable here and not in the commit,
    # which the executor then runs and bash answers with exit 126.
    repo = app_repo(tmp_path, command="./seed.sh")
    run_git(repo, "config", "core.fileMode", "false")
    commit_all(repo)
    (repo / SCRIPT).chmod(0o755)
    assert run_git(repo, "status", "--porcelain") == ""  # git sees nothing to commit
    result = cli(tmp_path, "validate", str(repo))
    assert result.returncode == 1, result.stdout
    assert (f"error: script {SCRIPT} is run directly but is not executable in the "
            "commit") in result.stdout
    assert f"git update-index --chmod=+x {SCRIPT}" in result.stdout

    # The other way round: executable in the commit, not in the working copy: fine.
    run_git(repo, "update-index", "--chmod=+x", SCRIPT)
    run_git(repo, "commit", "-q", "-m", "x bit")
    (repo / SCRIPT).chmod(0o644)
    result = cli(tmp_path, "validate", str(repo))
    assert result.returncode == 0, result.stdout
    assert "0 error(s)" in result.stdout


def test_validate_warns_about_a_script_that_is_not_committed(tmp_path: Path) -> None:
    repo = app_repo(tmp_path, command="./seed.sh")
    (repo / "README").write_text("app\n")
    run_git(repo, "add", "README", "appspec.yaml")
    run_git(repo, "commit", "-q", "-m", "without the script")
    (repo / SCRIPT).chmod(0o755)
    result = cli(tmp_path, "validate", str(repo))
    assert f"warning: script {SCRIPT} is not committed" in result.stdout
