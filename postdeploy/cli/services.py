"""The long-running services: `up` (all in one), or worker, beat, Flower, metrics
and the webhook service each on its own."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import click

from postdeploy.cli.group import cli, common_options, common_overrides, with_settings
from postdeploy.config.logs import configure_logging
from postdeploy.config.settings import (
    DEFAULT_FLOWER_PORT,
    DEFAULT_LISTEN_ADDRESS,
    DEFAULT_METRICS_PORT,
    Settings,
)
from postdeploy.errors import ConfigError

PORT = click.IntRange(1, 65535)
# worker and beat pass what they do not know on to Celery (`python -m worker -Q x`).
PASS_THROUGH = {"ignore_unknown_options": True, "allow_extra_args": True}


@cli.command()
@click.option("--repo", help="Watch one app: a git URL or path (POSTDEPLOY_REPO).")
@click.option("--branch", help="Branch to follow (POSTDEPLOY_BRANCH; default: HEAD).")
@click.option("--name", help="App name (POSTDEPLOY_APP; default: the repo's name).")
@click.option("--interval", type=click.FloatRange(min=0, min_open=True),
              help="Seconds between commit checks (POSTDEPLOY_CHECK_INTERVAL, default 30).")
@click.option("--flower", is_flag=True, help="Also run Flower (task monitor).")
@click.option("--flower-address", default=DEFAULT_LISTEN_ADDRESS, show_default=True)
@click.option("--flower-port", type=PORT, default=DEFAULT_FLOWER_PORT, show_default=True)
@click.option("--webhook-port", type=PORT, default=None,
              help="Also run the push webhook service on this port "
                   "(needs POSTDEPLOY_WEBHOOK_SECRET).")
@click.option("--webhook-address", default=DEFAULT_LISTEN_ADDRESS, show_default=True)
@common_options
@click.pass_context
def up(ctx: click.Context, repo: str | None, branch: str | None, name: str | None,
       interval: float | None, flower: bool, flower_address: str, flower_port: int,
       webhook_port: int | None, webhook_address: str,
       state_dir: str | None, config: str | None, redis_url: str | None,
       redis_url_file: str | None) -> int:
    """All-in-one: Redis (embedded unless given), a worker, beat; Ctrl-C stops all."""
    from postdeploy.services.up import UpOptions, run_up

    settings = Settings.load(overrides={
        **common_overrides(ctx, state_dir, config, redis_url, redis_url_file),
        "repo": repo, "branch": branch, "name": name, "check_interval": interval})
    configure_logging(settings.log_level)
    single_repo = bool(repo or settings.environ.get("POSTDEPLOY_REPO"))
    return run_up(settings, UpOptions(flower=flower, flower_address=flower_address,
                                      flower_port=flower_port, single_repo=single_repo,
                                      webhook_port=webhook_port,
                                      webhook_address=webhook_address))



@cli.command()
@click.option("--address", default="127.0.0.1", show_default=True,
              help="Address to listen on (loopback: put a TLS proxy in front).")
@click.option("--port", type=click.IntRange(1, 65535), default=9810, show_default=True)
@click.option("--processes", type=click.IntRange(min=1), default=None,
              help="Server processes sharing the port (default: one per CPU, at most 4); "
                   "more answer a burst of deliveries sooner.")
@with_settings
def webhook(settings: Settings, address: str, port: int, processes: int | None) -> int:
    """Receive signed push webhooks (GitHub, GitLab, Gitea, Bitbucket, generic); check
    those apps now."""
    from postdeploy.webhook.processes import default_count
    from postdeploy.webhook.service import check_settings, serve

    check_settings(settings)  # refuse before anything else: no secret, no service
    configure_logging(settings.log_level)
    return serve(settings, address, port, processes or default_count())



@contextmanager
def celery_flags(role: str) -> Iterator[None]:
    """Celery's own usage errors (flags we passed on) as one line pointing at its help."""
    try:
        yield
    except click.UsageError as exc:
        raise ConfigError(f"{exc.format_message().rstrip('.')} (flags postdeploy does not know "
                          f"go to Celery; see `celery {role} --help`)") from None


@cli.command(context_settings=PASS_THROUGH)
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
@with_settings
def worker(settings: Settings, celery_args: tuple[str, ...]) -> int:
    """A Celery worker running jobs and checks (what `python -m worker` starts)."""
    from postdeploy.services.start import run_worker

    with celery_flags("worker"):
        run_worker(settings, celery_args)
    return 0


@cli.command(context_settings=PASS_THROUGH)
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
@with_settings
def beat(settings: Settings, celery_args: tuple[str, ...]) -> int:
    """Celery beat, sending the commit check every interval (`python -m beat`); run one."""
    from postdeploy.services.start import run_beat

    with celery_flags("beat"):
        run_beat(settings, celery_args)
    return 0


@cli.command()
@click.option("--address", default=DEFAULT_LISTEN_ADDRESS, show_default=True,
              help="Address to listen on; other than loopback needs FLOWER_BASIC_AUTH.")
@click.option("--port", type=PORT, default=DEFAULT_FLOWER_PORT, show_default=True)
@with_settings
def flower(settings: Settings, address: str, port: int) -> int:
    """Flower (task monitor) on postdeploy's tasks, auth from FLOWER_BASIC_AUTH."""
    from postdeploy.services.flower import run_flower

    run_flower(settings, address, port)
    return 0


@cli.command()
@click.option("--address", default=DEFAULT_LISTEN_ADDRESS, show_default=True,
              help="Address to listen on.")
@click.option("--port", type=PORT, default=DEFAULT_METRICS_PORT, show_default=True)
@with_settings
def metrics(settings: Settings, address: str, port: int) -> int:
    """Serve Prometheus metrics at /metrics, read from Redis on each scrape."""
    from postdeploy.services.metrics import run_metrics

    run_metrics(settings, address, port)
    return 0

