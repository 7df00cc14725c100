"""The per-app run lock (redis-py's Lock as the store hands it out) on a real Redis."""

from __future__ import annotations

import threading

import pytest
import redis
from redis.exceptions import LockNotOwnedError

from postdeploy.store import keys
from postdeploy.store.state import StateStore
from tests.support.core import wait_for


def test_one_holder_and_release_only_by_it(rclient: redis.Redis) -> None:
    store = StateStore(rclient)
    first, second = store.run_lock("shop", 30), store.run_lock("shop", 30)
    assert first.acquire(blocking=False)
    assert not second.acquire(blocking=False)
    assert store.run_lock("blog", 30).acquire(blocking=False)  # per app
    assert rclient.get(keys.run_lock("shop")) == first.local.token
    first.release()
    assert second.acquire(blocking=False)


def test_expiry_frees_a_dead_holders_lock_and_renewal_reports_the_loss(
        rclient: redis.Redis) -> None:
    store = StateStore(rclient)
    dead = store.run_lock("shop", 0.2)
    assert dead.acquire(blocking=False)
    alive = store.run_lock("shop", 0.2)
    wait_for(lambda: alive.acquire(blocking=False), 5, interval=0.05,
             what="the expired lock to be free")
    with pytest.raises(LockNotOwnedError):
        dead.reacquire()  # it was lost to another holder
    assert alive.reacquire() and alive.owned()
    assert 0 < rclient.pttl(keys.run_lock("shop")) <= 200
    with pytest.raises(LockNotOwnedError):
        dead.release()  # not the holder: the lock stays
    assert alive.owned()


def test_the_lock_is_not_bound_to_the_thread_that_took_it(rclient: redis.Redis) -> None:
    lock = StateStore(rclient).run_lock("shop", 30)
    assert lock.acquire(blocking=False)
    renewed: list[bool] = []
    thread = threading.Thread(target=lambda: renewed.append(lock.reacquire()))
    thread.start()
    thread.join(5)
    assert renewed == [True]
