"""Redis state: the reconciliation markers and capped history, on a real Redis."""

from __future__ import annotations

import redis

from postdeploy.store import keys
from postdeploy.store.records import RunRecord
from postdeploy.store.state import DONE_TTL, StateStore

SHA = "a" * 40
OTHER = "b" * 40


def test_observe_claims_a_deployment_once_until_done(rclient: redis.Redis) -> None:
    store = StateStore(rclient)
    first = store.observe("shop", SHA, None)
    assert first.started and first.claimed  # first sight: a deployment, claimed
    assert first.deployment.id == 1 and first.deployment.previous_sha is None
    again = store.observe("shop", SHA, 1)
    assert not again.started and not again.claimed  # queued already
    store.mark_done("shop", 1, "run-1")
    assert not store.observe("shop", SHA, 1).claimed  # ran already
    assert store.last_seen("shop") == SHA and store.checked_at("shop")
    rclient.expire(keys.done("shop", 1), 60)
    store.observe("shop", SHA, 1)  # a check of the current deployment keeps its marker alive
    assert rclient.ttl(keys.done("shop", 1)) > DONE_TTL - 10


def test_lapsed_claim_lets_the_deployment_be_enqueued_again(rclient: redis.Redis) -> None:
    store = StateStore(rclient)
    assert store.observe("shop", SHA, None).claimed
    store.hold_claim("shop", 1, 1)
    rclient.delete(keys.claim("shop", 1))  # as if the running worker died and it lapsed
    assert store.observe("shop", SHA, 1).claimed


def test_every_change_of_the_commit_is_a_deployment(rclient: redis.Redis) -> None:
    store = StateStore(rclient)
    seen = [store.observe("shop", sha, store.deployments.current_id("shop"))
            for sha in (SHA, OTHER, SHA, SHA, OTHER)]
    assert [(o.deployment.id, o.started, o.claimed) for o in seen] == [
        (1, True, True), (2, True, True), (3, True, True), (3, False, False),
        (4, True, True)]
    assert [o.deployment.previous_sha for o in seen] == [None, SHA, OTHER, OTHER, SHA]
    assert store.deployments.of_sha("shop", SHA) == seen[2].deployment  # the latest of A


def test_a_look_older_than_a_recorded_deployment_records_nothing(
        rclient: redis.Redis) -> None:
    store = StateStore(rclient)
    store.observe("shop", SHA, None)
    before = store.deployments.current_id("shop")  # a slow check reads this, then git...
    store.observe("shop", OTHER, before)  # ...meanwhile a push's check records B
    late = store.observe("shop", SHA, before)  # the slow check's answer predates B
    assert late.stale and not late.started and not late.claimed
    assert late.deployment.sha == OTHER and store.last_seen("shop") == OTHER


def test_a_commit_that_ran_before_deployments_does_not_run_again(
        rclient: redis.Redis) -> None:
    rclient.set(keys.last_seen("shop"), SHA)
    rclient.set(keys.commit_done("shop", SHA), "run-0")  # as versions before deployments left
    first = StateStore(rclient).observe("shop", SHA, None)
    assert first.started and not first.claimed
    assert first.deployment.previous_sha is None
    rclient.set(keys.commit_done("blog", SHA), "run-0")  # a path app's, the same
    store = StateStore(rclient)
    path_first = store.deployments.host_head("blog", "h1", SHA)
    assert path_first.started and store.is_done("blog", path_first.deployment.id)


def test_a_host_that_is_behind_never_undoes_the_fleets_commit(rclient: redis.Redis) -> None:
    log = StateStore(rclient).deployments
    assert log.host_head("shop", "h1", SHA).started  # the app's first report: deployment 1
    assert not log.host_head("shop", "h2", SHA).started  # joins it
    moved = log.host_head("shop", "h1", OTHER)
    assert moved.started and moved.deployment.previous_sha == SHA
    behind = log.host_head("shop", "h2", SHA)  # unchanged head, behind the fleet
    assert not behind.started and behind.deployment.sha == OTHER and behind.mine == 1
    assert not log.host_head("shop", "h3", SHA).started  # a first report at an old commit
    assert not log.host_head("shop", "h2", OTHER).started  # catches up: joins
    back = log.host_head("shop", "h2", SHA)  # the fleet moves back
    assert back.started and back.deployment.id == 3 and back.deployment.previous_sha == OTHER
    assert not log.host_head("shop", "h1", SHA).started


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
