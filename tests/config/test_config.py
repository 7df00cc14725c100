"""Operator settings: env vars, postdeploy.yaml and flags, each wrong value one exact line."""

from __future__ import annotations

from pathlib import Path

import pytest

from postdeploy.config.settings import Settings, default_app_name
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


@pytest.mark.parametrize("url", [
    "redis://localhost", "redis://:pw@redis:6379/0", "rediss://user:pw@host:6380/15",
    "redis://h:6379/?db=2", "unix:///run/redis.sock?db=1", "redis://[::1]:6379/0"])
def test_good_redis_urls_are_kept(url: str) -> None:
    assert load({"POSTDEPLOY_REDIS_URL": url}).redis_url == url


@pytest.mark.parametrize("env, message", [
    ({"POSTDEPLOY_CHECK_INTERVAL": "0.5"}, "'0.5' is out of range; use 1 to 604800 seconds"),
    ({"POSTDEPLOY_CHECK_INTERVAL": "nan"}, "'nan' is not a positive number of seconds"),
    ({"POSTDEPLOY_REDIS_URL": "redis://h:65536/0"}, "has a port that is not a TCP port"),
    ({"POSTDEPLOY_REDIS_URL": "redis://h:0/0"}, "has port 0, not a TCP port"),
    ({"POSTDEPLOY_REDIS_URL": "redis://h:6379/0/1"}, "more than a db number"),
    ({"POSTDEPLOY_REDIS_URL": "redis://h:6379/-1"}, "has db '-1', which is not a number"),
    ({"POSTDEPLOY_REDIS_URL": "redis://h/?db=one"}, "has db 'one', which is not a number"),
    ({"POSTDEPLOY_REDIS_URL": "unix://"}, "names no socket path"),
    ({"POSTDEPLOY_REDIS_URL": "localhost:6379"}, "expected redis://"),
    ({"POSTDEPLOY_REDIS_URL": "redis://h/?socket_timeout=abc"}, "Invalid value for "
                                                               "'socket_timeout'"),
    ({"POSTDEPLOY_KILL_GRACE": "86400"}, "invalid POSTDEPLOY_KILL_GRACE: '86400' is out of "
                                         "range; use at most 3600 seconds"),
    ({"POSTDEPLOY_HISTORY_LIMIT": "0"}, "invalid POSTDEPLOY_HISTORY_LIMIT: '0' is not a "
                                        "positive integer"),
    ({"POSTDEPLOY_REPO": "/srv/x", "POSTDEPLOY_APP": "a.LOCK"}, "not a valid app name"),
    ({"POSTDEPLOY_REPO": "/srv/x", "POSTDEPLOY_APP": "."}, "not a valid app name"),
    ({"POSTDEPLOY_REPO": "/srv/x", "POSTDEPLOY_APP": "-x"}, "not a valid app name"),
    ({"POSTDEPLOY_REPO": "/srv/x", "POSTDEPLOY_APP": "a/b"}, "not a valid app name"),
    ({"POSTDEPLOY_REPO": "/srv/x", "POSTDEPLOY_BRANCH": "a..b"}, "not a valid branch name"),
    ({"POSTDEPLOY_REPO": "/srv/x", "POSTDEPLOY_BRANCH": "main.lock"}, "not a valid branch"),
    ({"POSTDEPLOY_REPO": "/srv/x", "POSTDEPLOY_BRANCH": "a b"}, "not a valid branch name"),
])
def test_values_out_of_range_or_unsafe(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(env)
    assert message in str(info.value), str(info.value)
    assert "\n" not in str(info.value)


def test_error_names_the_flag_or_file_key_that_was_used(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^invalid POSTDEPLOY_CHECK_INTERVAL "
                                          r"\(--interval\): '0\.1' is out of range"):
        load({}, check_interval=0.1)
    config = tmp_path / "postdeploy.yaml"
    config.write_text("check_interval: 0.2\nredis_url: redis://h:99999/0\n")
    with pytest.raises(ConfigError, match=r"postdeploy\.yaml: redis_url: 'redis://h:99999/0'"):
        load({"POSTDEPLOY_CONFIG": str(config)})
    with pytest.raises(ConfigError, match=r"postdeploy\.yaml: check_interval: '0\.2'"):
        load({"POSTDEPLOY_CONFIG": str(config), "POSTDEPLOY_REDIS_URL": "redis://h/0"})


def test_good_branches_and_names_pass() -> None:
    settings = load({"POSTDEPLOY_REPO": "/srv/x", "POSTDEPLOY_APP": "shop.v2_eu-1",
                     "POSTDEPLOY_BRANCH": "release/2024.06"})
    assert settings.apps[0].name == "shop.v2_eu-1"
    assert settings.apps[0].branch == "release/2024.06"


@pytest.mark.parametrize("names", [("shop", "shop"), ("shop", "SHOP")])
def test_app_names_must_differ_ignoring_case(tmp_path: Path, names: tuple[str, str]) -> None:
    config = tmp_path / "postdeploy.yaml"
    config.write_text(f"apps:\n  - name: {names[0]}\n    repo: /a\n"
                      f"  - name: {names[1]}\n    repo: /b\n")
    with pytest.raises(ConfigError, match="name is used twice"):
        load({"POSTDEPLOY_CONFIG": str(config)})


def test_state_dir_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        load({"POSTDEPLOY_STATE_DIR": str(tmp_path / "f" / "below")})
    assert load({"POSTDEPLOY_STATE_DIR": str(tmp_path / "new")}).state_dir == tmp_path / "new"
