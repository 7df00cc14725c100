"""The run lifecycle on a real Redis: allowed moves, finished runs frozen, racing writers."""

from __future__ import annotations

import threading

import pytest
import redis

from postdeploy.store import keys, lifecycle
from postdeploy.store.lifecycle import TRANSITIONS, InvalidTransition
from postdeploy.store.records import RunRecord, Status, Trigger
from postdeploy.store.state import StateStore

SHA = "b" * 40
UNFINISHED = (Status.QUEUED, Status.WAITING, Status.RUNNING)


def stored_in(store: StateStore, status: Status) -> RunRecord:
    """A run stored with ``status``, reached through allowed moves."""
    record = lifecycle.new_run(store, "shop", SHA, Trigger.AUTO)
    if status == Status.QUEUED:
        return record
    path = [Status.RUNNING] if status == Status.RUNNING else [Status.WAITING]
    if status.finished:
        path = [Status.RUNNING, status] if status in TRANSITIONS[Status.RUNNING] \
            else [status]
    for step in path:
        assert lifecycle.move(store, record, step)
    return record


def test_every_allowed_move_is_stored_and_every_other_refused(rclient: redis.Redis) -> None:
    store = StateStore(rclient)
    for source in UNFINISHED:
        for target in Status:
            record = stored_in(store, source)
            if target in TRANSITIONS[source]:
                assert lifecycle.move(store, record, target), (source, target)
                assert store.get_run(record.id).status == target  # type: ignore[union-attr]
            else:
                with pytest.raises(InvalidTransition):
                    lifecycle.move(store, record, target)
                assert store.get_run(record.id).status == source  # type: ignore[union-attr]


def test_timestamps_and_the_finished_runs_counter(rclient: redis.Redis) -> None:
    store = StateStore(rclient)
    record = lifecycle.new_run(store, "shop", SHA, "manual", timeout=42)
    assert (record.status, record.trigger, record.timeout) == (Status.QUEUED, Trigger.MANUAL, 42)
    assert record.queued_at and record.started_at is None
    assert lifecycle.move(store, record, Status.RUNNING, worker="host-1")
    assert record.started_at and record.finished_at is None and record.worker == "host-1"
    assert lifecycle.update(store, record, command="make seed")
    assert lifecycle.move(store, record, Status.FAILED, exit_code=3, reason="exited with code 3")
    stored = store.get_run(record.id)
    assert stored is not None and stored == record
    assert stored.finished_at and stored.finished_at >= (stored.started_at or 0)
    assert (stored.command, stored.exit_code, stored.status) == ("make seed", 3, "failed")
    assert rclient.hgetall(keys.RUNS_TOTAL) == {b"shop\tmanual\tfailed": b"1"}
    raw = rclient.get(keys.run(record.id))
    assert raw and b'"status": "failed"' in raw and b'"trigger": "manual"' in raw


def test_a_finished_run_never_changes_again(rclient: redis.Redis) -> None:
    store = StateStore(rclient)
    record = stored_in(store, Status.RUNNING)
    stale = store.get_run(record.id)  # a stalled worker's copy, still "running"
    assert stale is not None
    assert lifecycle.move(store, record, Status.LOST, reason="its worker stopped mid-run")
    assert not lifecycle.move(store, stale, Status.FAILED, exit_code=1, reason="late")
    assert (stale.status, stale.reason) == (Status.LOST, "its worker stopped mid-run")
    assert not lifecycle.update(store, stale, output_bytes=99)  # not even its other fields
    assert not lifecycle.move(store, stale, Status.RUNNING)
    stored = store.get_run(record.id)
    assert stored is not None and (stored.status, stored.exit_code, stored.output_bytes) == (
        Status.LOST, None, 0)
    assert rclient.hgetall(keys.RUNS_TOTAL) == {b"shop\tauto\tlost": b"1"}


def test_racing_writers_only_one_finishes_the_run(rclient: redis.Redis,
                                                  redis_url: str) -> None:
    endings = [Status.SUCCEEDED, Status.FAILED, Status.TIMED_OUT, Status.ERROR, Status.LOST,
               Status.CANCELLED] * 4
    for _ in range(5):
        rclient.delete(keys.RUNS_TOTAL)
        record = stored_in(StateStore(rclient), Status.RUNNING)
        start = threading.Barrier(len(endings))
        won: list[Status] = []

        def finish(status: Status, start: threading.Barrier = start,
                   record: RunRecord = record, won: list[Status] = won) -> None:
            store = StateStore(redis.Redis.from_url(redis_url))  # a connection of its own
            mine = store.get_run(record.id)
            assert mine is not None
            start.wait()
            if lifecycle.move(store, mine, status, reason=f"by {status}"):
                won.append(status)

        threads = [threading.Thread(target=finish, args=(s,)) for s in endings]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert len(won) == 1, won
        stored = StateStore(rclient).get_run(record.id)
        assert stored is not None and (stored.status, stored.reason) == (won[0], f"by {won[0]}")
        assert sum(int(v) for v in rclient.hvals(keys.RUNS_TOTAL)) == 1


def test_a_run_lost_with_redis_data_is_stored_anew(rclient: redis.Redis) -> None:
    store = StateStore(rclient)
    record = stored_in(store, Status.RUNNING)
    rclient.flushdb()  # as a restart of a Redis without persistence
    assert lifecycle.move(store, record, Status.SUCCEEDED, exit_code=0)
    assert [r.id for r in store.history("shop")] == [record.id]
    assert store.get_run(record.id) == record
