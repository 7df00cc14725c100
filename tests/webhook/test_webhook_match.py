"""Which repository URLs name the same repository (webhook_match.repo_key)."""

from __future__ import annotations

from pathlib import Path

import pytest

from postdeploy.webhook.match import repo_key


@pytest.mark.parametrize("a,b", [
    ("https://github.com/acme/shop.git", "git@github.com:acme/shop.git"),
    ("https://user:token@GitHub.com/acme/shop", "ssh://git@github.com:22/acme/shop.git/"),
    ("git://github.com/Acme/Shop.git", "http://github.com/acme/shop/"),
    ("ssh://git@gitea.example.com:2222/acme/wiki.git", "https://gitea.example.com/acme/wiki"),
])
def test_repository_urls_compare_without_scheme_credentials_suffix_or_case(a: str,
                                                                           b: str) -> None:
    assert repo_key(a) == repo_key(b) is not None


@pytest.mark.parametrize("a,b", [
    ("https://github.com/acme/shop.git", "https://github.com/acme/shop-api.git"),
    ("https://github.com/acme/shop.git", "https://gitlab.com/acme/shop.git"),
    ("https://github.com/acme/shop.git", "https://github.com/other/shop.git"),
])
def test_different_repositories_stay_different(a: str, b: str) -> None:
    assert repo_key(a) != repo_key(b)


def test_local_paths_compare_by_real_path(tmp_path: Path) -> None:
    (tmp_path / "repo.git").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "repo.git")
    assert repo_key(str(tmp_path / "alias")) == repo_key(f"file://{tmp_path}/repo.git/")
    assert repo_key(str(tmp_path / "alias")) != repo_key(str(tmp_path / "repo"))
