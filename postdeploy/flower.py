"""`python -m postdeploy.flower [--address A] [--port P]`: Flower on postdeploy's Celery app.

Flower sees our tasks (the app includes postdeploy.tasks), keeps its task list
in ``<state_dir>/flower.db`` across restarts, and reads its authentication
itself from ``FLOWER_BASIC_AUTH=user:password[,user2:password2]``. Unlike the
worker and beat, Flower needs no apps configured, only Redis.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
from collections.abc import Mapping, Sequence

from postdeploy.celery_app import app, configure
from postdeploy.config import Settings
from postdeploy.connection import resolve_redis_url
from postdeploy.errors import ConfigError, PostdeployError
from postdeploy.logconfig import configure_logging

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "127.0.0.1"  # Flower can start tasks: loopback unless asked otherwise
DEFAULT_PORT = 5555  # Flower's usual port
DB_FILE = "flower.db"  # in the state dir: Flower's task list survives restarts
STATE_SAVE_INTERVAL_MS = 60_000  # also save while running, not only on a clean stop
PURGE_OFFLINE_WORKERS = 3_600  # seconds; every restarted worker has a new name
# The tasks page shows each run_job's app and commit (kwargs; result or error for
# a manual run whose sha defaulted to the last seen commit), and why a failed one failed.
TASK_COLUMNS = "name,state,kwargs,result,exception,received,runtime,worker,uuid"
AUTH_VARIABLES = ("FLOWER_BASIC_AUTH", "FLOWER_AUTH")  # Flower's own settings


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m postdeploy.flower",
        description="Flower (Celery monitor) for postdeploy, with basic auth from "
                    "FLOWER_BASIC_AUTH and its state in the postdeploy state dir.")
    parser.add_argument("--address", default=DEFAULT_ADDRESS,
                        help=f"address to listen on (default {DEFAULT_ADDRESS})")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"port to listen on (default {DEFAULT_PORT})")
    return parser.parse_args(list(argv))


def check_auth(environ: Mapping[str, str], address: str) -> bool:
    """True if Flower will ask for credentials; ConfigError for an unsafe or bad setting."""
    basic = environ.get("FLOWER_BASIC_AUTH", "")
    for index, entry in enumerate(basic.split(",") if basic else [], start=1):
        user, colon, password = entry.partition(":")
        if not (user and colon and password):
            # Never echo the value: it holds passwords.
            raise ConfigError(f"invalid FLOWER_BASIC_AUTH: entry {index} is not "
                              "user:password (entries are separated by commas)")
    protected = any(environ.get(name) for name in AUTH_VARIABLES)
    if not protected and not _is_loopback(address):
        raise ConfigError(f"refusing to serve Flower on {address} without authentication "
                          "(anyone could run jobs); set FLOWER_BASIC_AUTH=user:password "
                          f"or listen on {DEFAULT_ADDRESS}")
    return protected


def flower_argv(settings: Settings, address: str, port: int) -> list[str]:
    """The `celery flower` command line for these settings."""
    return ["flower", f"--address={address}", f"--port={port}",
            "--persistent=True", f"--db={settings.state_dir / DB_FILE}",
            f"--state_save_interval={STATE_SAVE_INTERVAL_MS}",
            f"--purge_offline_workers={PURGE_OFFLINE_WORKERS}",
            f"--tasks_columns={TASK_COLUMNS}",
            # Tornado would otherwise reset the root logger to INFO.
            f"--logging={settings.log_level.lower()}"]


def prepare(argv: Sequence[str]) -> list[str]:
    """Check settings, configure logging and Celery; the flower argv, or exit 2 with one line."""
    args = parse_args(argv)
    try:
        settings = Settings.load()
        if not 0 < args.port < 65_536:
            raise ConfigError(f"invalid --port: {args.port} is not a TCP port (1-65535)")
        protected = check_auth(settings.environ, args.address)
        url = resolve_redis_url(settings)
        _make_state_dir(settings)
    except PostdeployError as exc:
        print(f"postdeploy flower: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(settings.log_level)
    configure(settings, url)
    if not protected:
        log.warning("Flower has no authentication; anyone on this host can run jobs. "
                    "Set FLOWER_BASIC_AUTH=user:password")
    return flower_argv(settings, args.address, args.port)


def main(argv: Sequence[str] | None = None) -> None:
    flower_args = prepare(sys.argv[1:] if argv is None else argv)
    import postdeploy.tasks  # noqa: F401  (registers our tasks before Flower lists them)

    app.start(flower_args)


def _make_state_dir(settings: Settings) -> None:
    try:
        settings.state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create state dir {settings.state_dir}: {exc.strerror}; "
                          "check POSTDEPLOY_STATE_DIR") from None


def _is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


if __name__ == "__main__":
    main()
