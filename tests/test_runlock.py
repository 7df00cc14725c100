"""The per-app run lock on a real Redis: exclusive, renewable, released only by its holder."""

from __future__ import annotations

import redis

from postdeploy.runlock import RunLock
from tests.support import wait_for


def test_one_holder_and_compare_and_delete(rclient: redis.Redis) -> None:
    first, second = RunLock(rclient, "postdeploy:test:lock"), RunLock(rclient,
                                                                      "postdeploy:test:lock")
    assert first.acquire()
    assert not second.acquire()
    second.release()  # not the holder: nothing happens
    assert first.held_by_someone() and not second.acquire()
    first.release()
    assert second.acquire()


def test_expiry_frees_a_dead_holders_lock_and_renew_reports_loss(rclient: redis.Redis) -> None:
    dead = RunLock(rclient, "postdeploy:test:lock", ttl_ms=200)
    assert dead.acquire()
    alive = RunLock(rclient, "postdeploy:test:lock", ttl_ms=200)
    wait_for(alive.acquire, 5, interval=0.05, what="the expired lock to be free")
    assert dead.renew() is False  # it was lost to another holder
    assert alive.renew() is True
    assert rclient.pttl("postdeploy:test:lock") > 0
