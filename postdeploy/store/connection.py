"""Finding and connecting to Redis: the configured URL or the one `up` left behind."""

from __future__ import annotations

from pathlib import Path

import redis

from postdeploy.config.checks import check_redis_url
from postdeploy.config.redaction import redact_url
from postdeploy.config.settings import Settings
from postdeploy.errors import RedisUnavailable

ADDRESS_FILE = "redis.url"  # in the state dir, written by `postdeploy up`


def address_file(state_dir: Path) -> Path:
    return state_dir / ADDRESS_FILE


def resolve_redis_url(settings: Settings) -> str:
    """POSTDEPLOY_REDIS_URL, else the address a running `postdeploy up` left."""
    if settings.redis_url:
        return settings.redis_url
    path = address_file(settings.state_dir)
    if path.is_file():
        url = path.read_text().strip()
        if url:
            return check_redis_url(url, str(path))
    raise RedisUnavailable(
        f"no Redis configured and no running `postdeploy up` found in {settings.state_dir}; "
        "set POSTDEPLOY_REDIS_URL or start `postdeploy up` (or pass --state-dir)")


def redis_client(url: str, timeout: float = 30.0) -> redis.Redis:
    """A client that fails fast on a dead server instead of hanging; ``timeout``
    bounds each call (connecting: at most 5 s)."""
    return redis.Redis.from_url(url, socket_connect_timeout=min(5.0, timeout),
                                socket_timeout=timeout, health_check_interval=30,
                                retry_on_timeout=True)


def connect(url: str) -> redis.Redis:
    """A client that has answered PING, or RedisUnavailable with a clear line."""
    client = redis_client(url)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise RedisUnavailable(f"cannot reach Redis at {redact_url(url)} ({exc}); "
                               "is it running? check POSTDEPLOY_REDIS_URL") from None
    return client
