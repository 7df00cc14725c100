"""`postdeploy flower`: Flower on postdeploy's Celery app.

Flower sees our tasks (the app includes postdeploy.services.tasks), keeps its task list
in ``<state_dir>/flower.db`` across restarts, and reads its authentication
itself from ``FLOWER_BASIC_AUTH=user:password[,user2:password2]``. Unlike the
worker and beat, Flower needs no apps configured, only Redis.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Mapping

from postdeploy.config.checks import make_state_dir
from postdeploy.config.settings import DEFAULT_LISTEN_ADDRESS, Settings
from postdeploy.errors import ConfigError
from postdeploy.services.start import check_listen, prepare
from postdeploy.store.celery_app import app

log = logging.getLogger(__name__)

DB_FILE = "flower.db"  # in the state dir: Flower's task list survives restarts
STATE_SAVE_INTERVAL_MS = 60_000  # also save while running, not only on a clean stop
PURGE_OFFLINE_WORKERS = 3_600  # seconds; every restarted worker has a new name
# The tasks page shows each run_job's app and commit (kwargs; result or error for
# a manual run whose sha defaulted to the last seen commit), and why a failed one failed.
TASK_COLUMNS = "name,state,kwargs,result,exception,received,runtime,worker,uuid"
AUTH_VARIABLES = ("FLOWER_BASIC_AUTH", "FLOWER_AUTH")  # Flower's own settings


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
                          f"or listen on {DEFAULT_LISTEN_ADDRESS}")
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


def run_flower(settings: Settings, address: str, port: int) -> None:
    """Check the settings (ConfigError for a bad one), then serve Flower until stopped."""
    protected = check_auth(settings.environ, address)
    make_state_dir(settings.state_dir)
    check_listen(address, port)
    prepare(settings, need_apps=False)
    if not protected:
        log.warning("Flower has no authentication; anyone on this host can run jobs. "
                    "Set FLOWER_BASIC_AUTH=user:password")
    import postdeploy.services.tasks  # noqa: F401  (registers our tasks before Flower lists them)

    app.start(flower_argv(settings, address, port))


def _is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False
