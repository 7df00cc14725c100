"""The layering of docs/architecture.md holds, and the check that guards it bites.

`bin/test` runs `lint-imports` (import-linter, contracts in pyproject.toml). Here
a copy of the package gets one planted import that points back up, and one that
closes a circle: each must break the check, while the real tree keeps it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).with_name("lint-imports")


def lint(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LINT), "--no-cache", "--no-logo", str(tree / "pyproject.toml")],
                          cwd=tree, env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=120)


def copy_of_the_package(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "postdeploy", tree / "postdeploy",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    return tree


def plant(module: Path, line: str) -> None:
    module.write_text(module.read_text() + f"\n{line}\n")


def test_the_real_tree_keeps_both_contracts(tmp_path: Path) -> None:
    result = lint(copy_of_the_package(tmp_path))
    assert result.returncode == 0, result.stdout
    assert "Contracts: 2 kept, 0 broken." in result.stdout


@pytest.mark.parametrize("where,line,broken", [
    ("store/keys.py", "import postdeploy.cli.views  # noqa", "below it BROKEN"),
    ("config/settings.py", "from postdeploy.run import job  # noqa", "below it BROKEN"),
    ("run/runner.py", "from postdeploy.run import job  # noqa", "No import circles BROKEN"),
])
def test_a_planted_import_breaks_the_check(tmp_path: Path, where: str, line: str,
                                           broken: str) -> None:
    tree = copy_of_the_package(tmp_path)
    plant(tree / "postdeploy" / where, line)
    result = lint(tree)
    assert result.returncode != 0
    assert broken in result.stdout, result.stdout
