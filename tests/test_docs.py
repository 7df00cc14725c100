"""The README is a front door and docs/ holds the rest: every link lands, every
command the README lists exists, and the README stays short."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\((?!https?://|mailto:)([^)\s]+)\)")
README_LIMIT = 12 * 1024


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of ``page``."""
    found = set()
    in_code = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (m := re.match(r"#{1,6} (.*)", line)):
            found.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return found


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_link_lands_on_a_file_and_a_heading(page: Path) -> None:
    broken = []
    for target in LINK.findall(page.read_text()):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.name}")
    assert not broken, broken


def test_the_readme_is_a_front_door() -> None:
    assert len((ROOT / "README.md").read_bytes()) <= README_LIMIT
    for page in PAGES[1:]:
        assert f"(docs/{page.name})" in (ROOT / "README.md").read_text(), page.name


def test_every_command_the_readme_lists_exists() -> None:
    table = (ROOT / "README.md").read_text().split("## Commands", 1)[1]
    names = sorted({name for row in re.findall(r"^\| `([^`]+)`", table, re.M)
                    for name in [row.split()[0]]} |
                   {"worker", "beat", "flower", "metrics", "webhook"})
    for name in names:
        result = subprocess.run([sys.executable, "-m", "postdeploy.cli", name, "--help"],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, (name, result.stderr)
