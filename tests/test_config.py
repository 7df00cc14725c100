"""Operator settings: env vars, postdeploy.yaml and flags, each wrong value one exact line."""

from __future__ import annotations

from pathlib import Path

import pytest

from postdeploy.config import Settings, default_app_name
from postdeploy.errors import ConfigError


def load(env: dict[str, str], **flags: object) -> Settings:
    return Settings.load(env, flags)


def test_defaults_and_single_repo(tmp_path: Path) -> None:
    settings = load({"POSTDEPLOY_REPO": "https://tok@git.example.com/acme/shop.git"})
    assert settings.check_interval == 30 and settings.kill_grace == 10
    assert settings.output_limit == 1024 * 1024 and settings.history_limit == 50
    (app,) = settings.apps
    assert (app.name, app.branch) == ("shop", None)
    assert app.source == "https://***@git.example.com/acme/shop.git"


def test_flags_override_environment() -> None:
    settings = load({"POSTDEPLOY_CHECK_INTERVAL": "5", "POSTDEPLOY_REPO": "/srv/a"},
                    check_interval=2.0, name="other")
    assert settings.check_interval == 2.0
    assert settings.apps[0].name == "other"


@pytest.mark.parametrize("source, name", [
    ("https://example.com/acme/shop.git", "shop"), ("git@example.com:acme/blog.git", "blog"),
    ("/srv/apps/api/", "api")])
def test_default_app_name(source: str, name: str) -> None:
    assert default_app_name(source) == name


@pytest.mark.parametrize("env, message", [
    ({"POSTDEPLOY_CHECK_INTERVAL": "abc"},
     "invalid POSTDEPLOY_CHECK_INTERVAL: 'abc' is not a positive number of seconds"),
    ({"POSTDEPLOY_CHECK_INTERVAL": "0"}, "invalid POSTDEPLOY_CHECK_INTERVAL: '0'"),
    ({"POSTDEPLOY_KILL_GRACE": "-1"}, "invalid POSTDEPLOY_KILL_GRACE: '-1'"),
    ({"POSTDEPLOY_OUTPUT_LIMIT": "1.5"}, "invalid POSTDEPLOY_OUTPUT_LIMIT: '1.5' is not a "
                                         "positive integer"),
    ({"POSTDEPLOY_REDIS_URL": "http://u:pw@h/0"}, "invalid POSTDEPLOY_REDIS_URL: "
                                                 "'http://***@h/0'"),
    ({"POSTDEPLOY_LOG_LEVEL": "loud"}, "invalid POSTDEPLOY_LOG_LEVEL: 'loud'"),
    ({"POSTDEPLOY_REPO": "--upload-pack=touch x"}, "looks like a command-line option"),
    ({"POSTDEPLOY_REPO": "ext::sh -c touch% x"}, "'<transport>::' address"),
    ({"POSTDEPLOY_REPO": "ftp://example.com/x.git"}, "unsupported scheme"),
    ({"POSTDEPLOY_REPO": "/srv/x", "POSTDEPLOY_APP": "no spaces"}, "not a valid app name"),
    ({"POSTDEPLOY_CONFIG": "/nonexistent/postdeploy.yaml"}, "not found"),
])
def test_bad_settings_are_one_exact_line(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(env)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text, message", [
    ("apps: [unclosed", "invalid YAML at line 1"),
    ("- a\n", "top level must be a mapping"),
    ("colour: blue\n", "unknown key 'colour'"),
    ("apps: {a: 1}\n", "'apps' must be a list"),
    ("apps:\n  - repo: /x\n    path: /y\n", "give exactly one of 'repo' or 'path'"),
    ("apps:\n  - name: shop\n    repo: /x\n    branch: 3\n", "app 'shop': 'branch' must be a "
                                                          "string"),
    ("apps:\n  - name: blog\n    path: /x\n    branch: main\n", "app 'blog': 'branch' only "
                                                            "applies to 'repo' apps"),
    ("apps:\n  - repo: /x/shop\n  - repo: /y/shop\n", "app 'shop': name is used twice"),
    ("apps:\n  - name: shop\n    repo: /x\n    colour: blue\n", "unknown field 'colour'"),
])
def test_bad_config_file_names_app_and_field(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "postdeploy.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError) as info:
        load({"POSTDEPLOY_CONFIG": str(config)})
    assert message in str(info.value), str(info.value)
    assert str(config) in str(info.value)


def test_config_file_apps_and_values(tmp_path: Path) -> None:
    config = tmp_path / "postdeploy.yaml"
    config.write_text("check_interval: 7\napps:\n  - name: shop\n    repo: repos/shop.git\n"
                      "    branch: main\n  - path: /srv/blog\n")
    settings = load({"POSTDEPLOY_CONFIG": str(config)})
    assert settings.check_interval == 7
    shop, blog = settings.apps
    assert (shop.repo, shop.branch) == (str(tmp_path / "repos/shop.git"), "main")
    assert (blog.name, blog.path) == ("blog", "/srv/blog")
