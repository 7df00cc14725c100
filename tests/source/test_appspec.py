"""appspec.yaml: reading it at a commit, and the rules for command, folder, timeout, envs."""

from __future__ import annotations

from pathlib import Path

import pytest

from postdeploy.config.settings import MAX_TIMEOUT, AppConfig
from postdeploy.errors import AppSpecError, GitError
from postdeploy.source.appspec import (
    DEFAULT_TIMEOUT,
    check_folder_value,
    parse_appspec,
    resolve_folder,
)
from postdeploy.source.git import AppSource, CommitMissing
from tests.support.core import GitRemote, appspec_yaml


def spec(text: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return parse_appspec(text.encode(), env or {})


def test_reads_job_keys_and_passes_other_envs() -> None:
    parsed = spec(appspec_yaml("bash seed.sh", "scripts/post-deploy", "120",
                               envs={"GREETING": "hi"}, secrets={"DATABASE_URL": "pg://x"}))
    assert parsed.command == "bash seed.sh"
    assert parsed.folder == "scripts/post-deploy"
    assert parsed.timeout == 120
    assert parsed.env == {"GREETING": "hi", "DATABASE_URL": "pg://x"}
    assert parsed.secrets == {"pg://x"}
    assert parsed.warnings == ()


def test_guide_example_with_comment_parses() -> None:
    text = ('envs:\n  - key: POST_DEPLOY_FOLDER\n    value: scripts/post-deploy\n'
            '  - key: POST_DEPLOY_COMMAND\n    value: bash seed.sh\n'
            '  - key: POST_DEPLOY_TIMEOUT\n    value: "300"  # 5 minutes\n')
    parsed = spec(text)
    assert (parsed.command, parsed.folder, parsed.timeout) == ("bash seed.sh",
                                                               "scripts/post-deploy", 300)


def test_missing_file_and_unset_command() -> None:
    assert parse_appspec(None, {}).command is None
    assert spec(appspec_yaml(timeout="10")).command is None
    assert spec(appspec_yaml("   ")).command is None


def test_executor_environment_is_the_fallback() -> None:
    env = {"POST_DEPLOY_COMMAND": "echo from-env", "POST_DEPLOY_TIMEOUT": "42"}
    assert parse_appspec(None, env).command == "echo from-env"
    assert parse_appspec(None, env).timeout == 42
    # The file wins where it sets a key.
    assert spec(appspec_yaml("echo file"), env).command == "echo file"


@pytest.mark.parametrize("value", ["abc", "0", "-1", "1e9", "", "1.5", "²"])
def test_bad_timeout_warns_and_uses_default(value: str) -> None:
    parsed = spec(appspec_yaml("true", timeout=value))
    assert parsed.timeout == DEFAULT_TIMEOUT
    assert len(parsed.warnings) == 1 and "POST_DEPLOY_TIMEOUT" in parsed.warnings[0]


def test_huge_timeout_is_capped() -> None:
    parsed = spec(appspec_yaml("true", timeout="1000000000"))
    assert parsed.timeout == MAX_TIMEOUT and parsed.warnings


def test_unquoted_number_is_accepted() -> None:
    assert spec("envs:\n- key: POST_DEPLOY_TIMEOUT\n  value: 60\n").timeout == 60


@pytest.mark.parametrize("folder", ["/etc", "../..", "a/../../b", ".."])
def test_folder_outside_repo_is_refused(folder: str) -> None:
    with pytest.raises(AppSpecError, match="POST_DEPLOY_FOLDER"):
        check_folder_value(folder)


def test_folder_symlink_leading_out_is_refused(tmp_path: Path) -> None:
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "out").symlink_to(tmp_path)
    with pytest.raises(AppSpecError, match="symlink"):
        resolve_folder(tmp_path / "repo", "out")
    with pytest.raises(AppSpecError, match="does not exist"):
        resolve_folder(tmp_path / "repo", "missing")
    assert resolve_folder(tmp_path / "repo", "") == (tmp_path / "repo").resolve()


@pytest.mark.parametrize("text, message", [
    ("envs: [unclosed", "invalid YAML"),
    ("- a\n- b\n", "top level must be a mapping"),
    ("envs: {a: 1}", "'envs' must be a list"),
    ("envs:\n- just-a-string\n", "must be a mapping"),
    ("envs:\n- key: ключ\n  value: x\n", "not a valid environment variable name"),
    ("envs:\n- key: A\n  value: [1, 2]\n", "value must be a string"),
    ("a: &a [x, x]\nb: &b [*a, *a]\nc: [*b, *b]\n", "aliases"),
    # Deep nesting within the size limit: an error, never a RecursionError.
    ("envs: " + "[" * 30000 + "]" * 30000, "invalid YAML"),
    ("envs:\n" + "- " * 20000 + "x", "invalid YAML"),
])
def test_malformed_appspec_is_an_error(text: str, message: str) -> None:
    with pytest.raises(AppSpecError, match=message) as info:
        spec(text)
    assert "\n" not in str(info.value)


def test_oversized_appspec_is_refused() -> None:
    with pytest.raises(AppSpecError, match="bytes; the limit"):
        parse_appspec(b"# " + b"x" * (10 * 1024 * 1024), {})


@pytest.mark.parametrize("kind", ["repo", "path"])
def test_the_reader_refuses_an_oversized_appspec_by_its_size(
        kind: str, tmp_path: Path, remote: GitRemote) -> None:
    big = remote.commit({"appspec.yaml": b"# " + b"x" * (2 * 1024 * 1024)}, "huge")
    size = 2 + 2 * 1024 * 1024
    app = (AppConfig(name="shop", repo=remote.url) if kind == "repo"
           else AppConfig(name="shop", path=str(remote.work)))
    source = AppSource(app, tmp_path / "state")
    expected = f"appspec.yaml is {size} bytes; the limit is 1048576 bytes"
    with pytest.raises(AppSpecError) as info:
        source.read_appspec(big)
    assert str(info.value) == expected
    with pytest.raises(AppSpecError) as info:
        source.prepare(big)
    assert str(info.value) == expected


def test_the_reader_refuses_an_appspec_symlink_for_every_kind_of_app(
        tmp_path: Path, remote: GitRemote) -> None:
    (remote.work / "real.yaml").write_text(appspec_yaml("echo hi"))
    (remote.work / "appspec.yaml").symlink_to("real.yaml")
    linked = remote.commit({}, "appspec is a symlink")
    for app in (AppConfig(name="shop", repo=remote.url),
                AppConfig(name="shop", path=str(remote.work))):
        source = AppSource(app, tmp_path / "state")
        for read in (lambda s=source: s.read_appspec(linked),
                     lambda s=source: s.prepare(linked)):
            with pytest.raises(AppSpecError, match="must be a regular file"):
                read()


def test_the_reader_gives_the_file_at_the_commit(tmp_path: Path, remote: GitRemote) -> None:
    first = remote.commit({"appspec.yaml": appspec_yaml("echo one")})
    remote.commit({"appspec.yaml": appspec_yaml("echo two")})
    source = AppSource(AppConfig(name="shop", repo=remote.url), tmp_path / "state")
    assert source.read_appspec(first) == appspec_yaml("echo one").encode()
    workdir, text = source.prepare(first)
    assert text == (workdir / "appspec.yaml").read_bytes()
    none = remote.commit({}, "nothing changes")
    (remote.work / "appspec.yaml").unlink()
    gone = remote.commit({}, "no appspec")
    assert source.read_appspec(none) is not None and source.read_appspec(gone) is None


def test_the_reader_refuses_an_appspec_directory(tmp_path: Path, remote: GitRemote) -> None:
    sha = remote.commit({"appspec.yaml/inner.yaml": appspec_yaml("echo hi")}, "a directory")
    for app in (AppConfig(name="shop", repo=remote.url),
                AppConfig(name="shop", path=str(remote.work))):
        source = AppSource(app, tmp_path / "state")
        with pytest.raises(AppSpecError, match="must be a regular file"):
            source.read_appspec(sha)
        with pytest.raises(AppSpecError, match="must be a regular file"):
            source.prepare(sha)


def test_the_reader_fetches_as_asked_and_never_when_told_not_to(
        tmp_path: Path, remote: GitRemote) -> None:
    first = remote.commit({"appspec.yaml": appspec_yaml("echo one")})
    source = AppSource(AppConfig(name="shop", repo=remote.url), tmp_path / "state")
    assert source.read_appspec(first) == appspec_yaml("echo one").encode()  # clones
    second = remote.commit({"appspec.yaml": appspec_yaml("echo two")})
    with pytest.raises(CommitMissing, match="not on this host yet"):
        source.read_appspec(second, fetch="never")
    assert source.read_appspec(second, fetch="first") == appspec_yaml("echo two").encode()
    assert source.read_appspec(second, fetch="never") == appspec_yaml("echo two").encode()
    empty = remote.commit({"appspec.yaml": ""}, "an empty appspec")
    assert source.read_appspec(empty) == b""
    with pytest.raises(GitError, match=f"commit {'0' * 12} not found in"):
        source.read_appspec("0" * 40)
