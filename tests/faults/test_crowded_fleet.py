"""Three beats and four workers on one Redis; twenty commits pushed as fast as git can."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.faults.conftest import Executor, FaultScope
from tests.faults.harness import audit, journal_job, journal_lines, overlapping
from tests.support.core import GitRemote, appspec_yaml, runs, wait_for

COMMITS = 20


def test_crowded_fleet(tmp_path: Path, remote: GitRemote, executor: Callable[..., Executor],
                       fault: FaultScope, report: Callable[[str], None]) -> None:
    journal = tmp_path / "journal"
    job = appspec_yaml(journal_job(journal, "sleep 0.3"))
    shas = [remote.commit({"appspec.yaml": job}, "c0")]
    # One concurrency slot per worker: eight Python processes already share two cores.
    fleet = executor(interval=1.0, start=False, POSTDEPLOY_CONCURRENCY="1")
    client = fleet.client
    for n in range(4):
        fleet.start(f"-{n}", beat=n < 3, POSTDEPLOY_STATE_DIR=str(tmp_path / f"state-{n}"))

    with fault(f"crowded fleet: 3 beats, 4 workers, {COMMITS} fast commits") as f:
        wait_for(lambda: any(r.sha == shas[0] for r in runs(client, "shop")), 60,
                 what="the first commit to be picked up")
        for i in range(1, COMMITS + 1):
            shas.append(remote.commit({"appspec.yaml": job, "n": str(i)}, f"c{i}"))
        wait_for(lambda: any(r.sha == shas[-1] and r.status == "succeeded"
                             for r in runs(client, "shop")), 90,
                 what="the latest commit's job")
        history = runs(client, "shop")
        executed = [r for r in history if r.started_at and r.status != "superseded"]
        per_sha = {s: sum(1 for r in executed if r.sha == s) for s in shas}
        assert max(per_sha.values()) <= 1, per_sha
        assert overlapping(history) == []
        assert journal_lines(journal, "overlap") == []
        assert len(journal_lines(journal, "start")) == len(executed)
        report(f"crowded fleet: {COMMITS + 1} commits, {len(executed)} executed, "
               f"{sum(1 for r in history if r.status == 'superseded')} superseded")
        f.audit = audit(client, "shop", [shas[-1]])
