"""The `postdeploy` command group, and what its commands share: the common options
and the Settings they load, the state store, the one error line and the exit codes.

The commands live in modules by concern (:mod:`postdeploy.cli.operate`,
:mod:`postdeploy.cli.services`) and register themselves on :data:`cli`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from postdeploy import __version__
from postdeploy.config.redaction import redact_url
from postdeploy.config.settings import Settings
from postdeploy.errors import RedisUnavailable
from postdeploy.store.connection import address_file, connect, resolve_redis_url
from postdeploy.store.state import StateStore

F = TypeVar("F", bound=Callable[..., Any])
EXIT_USAGE = 2  # bad flags or configuration
EXIT_FAILED = 1  # anything else that went wrong


def common_options(func: F) -> F:
    """--state-dir / --config / --redis-url(-file), accepted before or after the command name."""
    options = [
        click.option("--state-dir", type=click.Path(file_okay=False), default=None,
                     help="State directory (POSTDEPLOY_STATE_DIR, default ./.postdeploy)."),
        click.option("--config", type=click.Path(dir_okay=False), default=None,
                     help="postdeploy.yaml with 'apps:' (POSTDEPLOY_CONFIG)."),
        click.option("--redis-url", default=None,
                     help="Redis URL without a password (POSTDEPLOY_REDIS_URL); default: "
                          "the running `up`."),
        click.option("--redis-url-file", type=click.Path(dir_okay=False), default=None,
                     help="A file holding the Redis URL: the way to give one with a "
                          "password, which never belongs on a command line."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def with_settings(func: F) -> F:
    """Merge the command's and the group's common options into a loaded Settings."""

    def wrapper(ctx: click.Context, /, state_dir: str | None, config: str | None,
                redis_url: str | None, redis_url_file: str | None, **kwargs: Any) -> Any:
        overrides = common_overrides(ctx, state_dir, config, redis_url, redis_url_file)
        return func(Settings.load(overrides=overrides), **kwargs)

    # click names the command and writes its help from these.
    wrapper.__name__, wrapper.__doc__ = func.__name__, func.__doc__
    return common_options(click.pass_context(wrapper))  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="postdeploy")
@common_options
@click.pass_context
def cli(ctx: click.Context, state_dir: str | None, config: str | None,
        redis_url: str | None, redis_url_file: str | None) -> None:
    """Run an app's POST_DEPLOY job once per deployed commit."""
    ctx.obj = {"state_dir": state_dir, "config": config, "redis_url": redis_url,
               "redis_url_file": redis_url_file}


def common_overrides(ctx: click.Context, state_dir: str | None, config: str | None,
                     redis_url: str | None, redis_url_file: str | None) -> dict[str, Any]:
    """The common options given after the command name, else before it."""
    group = ctx.obj or {}
    return {"state_dir": state_dir or group.get("state_dir"),
            "config": config or group.get("config"),
            "redis_url": redis_url or group.get("redis_url"),
            "redis_url_file": redis_url_file or group.get("redis_url_file")}


def open_store(settings: Settings) -> tuple[str, StateStore]:
    """Redis URL and a StateStore, or RedisUnavailable saying what to start."""
    url = resolve_redis_url(settings)
    try:
        client = connect(url)
    except RedisUnavailable:
        if settings.redis_url:
            raise
        raise RedisUnavailable(
            f"the `postdeploy up` that wrote {address_file(settings.state_dir)} is not "
            f"running (Redis at {redact_url(url)} does not answer); start `postdeploy up` "
            "again") from None
    return url, StateStore(client, settings.history_limit)


def fail(message: str, code: int) -> int:
    """Print the one error line; return the exit code."""
    line = " ".join(redact_url(message).split())
    click.echo(f"postdeploy: error: {line}", err=True)
    return code
