"""The per-app run lock with its fencing token (postdeploy.store.fencing) on a real Redis."""

from __future__ import annotations

import redis

from postdeploy.store import keys, lifecycle
from postdeploy.store.records import Status
from postdeploy.store.state import StateStore
from tests.support.core import wait_for


def test_one_holder_and_release_only_by_it(rclient: redis.Redis) -> None:
    store = StateStore(rclient)
    first, second = store.run_lock("shop", 30), store.run_lock("shop", 30)
    assert first.acquire()
    assert not second.acquire()
    assert store.run_lock("blog", 30).acquire()  # per app
    assert rclient.get(keys.run_lock("shop")) == (first.token or "").encode()
    assert first.release()
    assert second.acquire()


def test_tokens_only_grow_and_a_lapsed_holder_cannot_release(rclient: redis.Redis) -> None:
    store = StateStore(rclient)
    dead = store.run_lock("shop", 0.2)
    assert dead.acquire()
    alive = store.run_lock("shop", 0.2)
    wait_for(lambda: alive.acquire(), 5, interval=0.05, what="the expired lock to be free")
    assert int(alive.token or 0) > int(dead.token or 0)
    assert not dead.release()  # not the holder: the lock stays
    assert rclient.get(keys.run_lock("shop")) == (alive.token or "").encode()


def test_a_stale_token_cannot_write_the_run(rclient: redis.Redis) -> None:
    store = StateStore(rclient)
    record = lifecycle.new_run(store, "shop", "a" * 40, "auto")
    stale = store.run_lock("shop", 0.2)
    assert stale.acquire()
    assert lifecycle.move(store, record, Status.RUNNING, fence=stale.fence())
    assert store.write_output(record.id, b"first", 5, stale.fence())
    current = store.run_lock("shop", 30)
    wait_for(lambda: current.acquire(), 5, interval=0.05, what="the lock to lapse")
    assert not lifecycle.move(store, record, Status.SUCCEEDED, fence=stale.fence(), exit_code=0)
    assert not store.write_output(record.id, b"late", 4, stale.fence())
    assert store.get_run(record.id).status == Status.RUNNING  # type: ignore[union-attr]
    assert store.read_output(record.id) == (b"first", 5)
    assert lifecycle.move(store, record, Status.LOST, fence=current.fence())


def test_a_lapsed_token_may_still_write_while_nobody_took_the_lock(
        rclient: redis.Redis) -> None:
    store = StateStore(rclient)
    record = lifecycle.new_run(store, "shop", "a" * 40, "auto")
    lapsed = store.run_lock("shop", 0.2)
    assert lapsed.acquire()
    assert lifecycle.move(store, record, Status.RUNNING, fence=lapsed.fence())
    wait_for(lambda: not rclient.exists(keys.run_lock("shop")), 5, interval=0.05,
             what="the lock to lapse")
    assert lifecycle.move(store, record, Status.SUCCEEDED, fence=lapsed.fence(), exit_code=0)
