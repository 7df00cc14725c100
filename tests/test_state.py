"""Redis state: the reconciliation markers and capped history, on a real Redis."""

from __future__ import annotations

import redis

from postdeploy import keys
from postdeploy.records import RunRecord
from postdeploy.state import DONE_TTL, StateStore

SHA = "a" * 40


def test_observe_claims_a_commit_once_until_done(rclient: redis.Redis) -> None:
    store = StateStore(rclient)
    assert store.observe("shop", SHA) is True  # first sight: needs a run, claimed
    assert store.observe("shop", SHA) is False  # queued already
    store.mark_done("shop", SHA, "run-1")
    assert store.observe("shop", SHA) is False  # ran already
    assert store.last_seen("shop") == SHA and store.checked_at("shop")
    rclient.expire(keys.done("shop", SHA), 60)
    store.observe("shop", SHA)  # a check of the current commit keeps its marker alive
    assert rclient.ttl(keys.done("shop", SHA)) > DONE_TTL - 10


def test_lapsed_claim_lets_the_commit_be_enqueued_again(rclient: redis.Redis) -> None:
    store = StateStore(rclient)
    assert store.observe("shop", SHA)
    store.hold_claim("shop", SHA, 1)
    rclient.delete(keys.claim("shop", SHA))  # as if the running worker died and it lapsed
    assert store.observe("shop", SHA) is True


def test_history_is_capped_and_drops_old_runs_and_outputs(rclient: redis.Redis) -> None:
    store = StateStore(rclient, history_limit=3)
    records = [RunRecord.new("shop", SHA, "auto") for _ in range(5)]
    for record in records:
        store.add_run(record)
        store.write_output(record.id, b"out", 3)
    assert [r.id for r in store.history("shop")] == [r.id for r in reversed(records[2:])]
    assert store.get_run(records[0].id) is None
    assert not rclient.exists(keys.output(records[0].id))
    assert store.read_output(records[-1].id) == (b"out", 3)
    assert all(k.startswith(keys.PREFIX.encode()) for k in rclient.keys("*"))
