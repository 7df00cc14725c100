"""The embedded redis-server of `postdeploy up`: persistence, password, leftovers."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from postdeploy.services.embedded_redis import EmbeddedRedis
from tests.support.core import process_alive


def test_data_survives_a_restart_and_a_password_is_required(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path)
    url = server.start()
    try:
        redis.Redis.from_url(url).set("postdeploy:probe", "kept")
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=server.port).get("postdeploy:probe")
        assert server.proc is not None  # the password is not on its command line
        assert server.password.encode() not in Path(f"/proc/{server.proc.pid}/cmdline"
                                                     ).read_bytes()
    finally:
        server.stop()
    assert list((tmp_path / "redis").glob("appendonly*"))  # the append-only data

    again = EmbeddedRedis(tmp_path)
    try:
        assert redis.Redis.from_url(again.start()).get("postdeploy:probe") == b"kept"
    finally:
        again.stop()


def test_a_leftover_server_on_the_same_data_dir_is_stopped_first(tmp_path: Path) -> None:
    leftover = EmbeddedRedis(tmp_path)  # as if the `up` that started it was SIGKILLed
    leftover.start()
    assert leftover.proc is not None
    old_pid = leftover.proc.pid
    fresh = EmbeddedRedis(tmp_path)
    try:
        fresh.start()
        # Stopped before the fresh server started (two servers on one append-only file
        # would corrupt it), so at once, not eventually; a zombie does not count as alive.
        assert not process_alive(old_pid)
        with pytest.raises(redis.ConnectionError):
            redis.Redis.from_url(leftover.url, socket_timeout=2).ping()
        assert fresh.proc is not None and fresh.proc.pid != old_pid
        assert redis.Redis.from_url(fresh.url).ping()
    finally:
        fresh.stop()
        leftover.stop()
