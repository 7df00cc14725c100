"""A run waiting for its app: the readiness gate applied across re-queued attempts.

Each attempt reads the gate from the appspec at the run's commit (once per
process and commit), expands the URL from the job's environment, probes once
and says: go, wait (the task re-queues itself, holding no worker process), or
give up (past POST_DEPLOY_WAIT_TIMEOUT: the run fails, LENIENT). A look never
runs past the wait's end: the probe is cut there even mid-read.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

from postdeploy.config.redaction import mask_secrets
from postdeploy.config.settings import Settings
from postdeploy.run.env import job_environment
from postdeploy.source.appspec import JobSpec, parse_appspec
from postdeploy.source.git import AppSource
from postdeploy.source.readiness import (
    PROBE_DEADLINE,
    PROBE_EVERY,
    Probe,
    gate_url,
    not_ready_reason,
    probe,
)

_SPECS: dict[tuple[str, str], JobSpec] = {}  # (app, sha) -> spec, in this process
_SPECS_KEPT = 256
# Seconds of wait left below which a look is not worth starting: it could not finish,
# and cut that short it would only say "no complete answer"; the last look's answer stands.
MIN_LOOK = 0.5
_LAST = ": last answered "  # in a waiting run's reason, before what the app answered


class GateWait(Exception):
    """The app is not ready yet: re-queue the run after ``countdown`` seconds."""

    def __init__(self, run_id: str, countdown: float, since: float) -> None:
        super().__init__(f"run {run_id} waiting, next look in {countdown:g} s")
        self.run_id = run_id
        self.countdown = countdown
        self.since = since


@dataclass(frozen=True)
class Verdict:
    """One look at the app for a run."""

    ready: bool
    url: str  # secrets masked: it goes into the run's reason
    last: Probe
    since: float  # when the run started waiting
    timeout: int

    @property
    def timed_out(self) -> bool:
        return not self.ready and time.time() - self.since >= self.timeout - MIN_LOOK

    @property
    def waiting_reason(self) -> str:
        return f"waiting for {self.url}{_LAST}{self.last.answer}"

    @property
    def failed_reason(self) -> str:
        return not_ready_reason(self.url, self.last, time.time() - self.since)


def look(settings: Settings, source: AppSource, sha: str, since: float | None,
         extra_env: Mapping[str, str], waiting_reason: str | None = None,
         gated: bool | None = None) -> Verdict | None:
    """Probe the app's readiness gate once; None when the app sets none.

    ``waiting_reason``: the run's reason from its previous look, whose answer
    stands when this look comes too late to probe (the wait is over). ``gated``
    False: the check that queued the run read the appspec at ``sha`` and found no
    gate, so it is not read again (two git processes spared per run).

    Raises AppSpecError for a malformed appspec or a URL that cannot be used
    (the run then ends as ``error``), GitError when the commit cannot be read.
    """
    if gated is False:
        return None
    spec = _spec(settings, source, sha)
    if spec.gate is None:
        return None
    env = {**job_environment(settings.environ, spec.env, source.app.name, sha), **extra_env}
    url = gate_url(spec.gate, env)
    since = since if since is not None else time.time()
    left = since + spec.gate.timeout - time.time()
    if left < MIN_LOOK and waiting_reason and _LAST in waiting_reason:
        result = Probe(False, waiting_reason.split(_LAST, 1)[1])
    else:
        result = probe(url, sha if spec.gate.wait_for_commit else None,
                       within=min(PROBE_DEADLINE, max(left, MIN_LOOK)))
    return Verdict(result.ready, mask_secrets(url, spec.secrets), result, since,
                   spec.gate.timeout)


def next_look() -> float:
    return PROBE_EVERY


def _spec(settings: Settings, source: AppSource, sha: str) -> JobSpec:
    key = (source.app.name, sha)
    spec = _SPECS.get(key)
    if spec is None:
        spec = parse_appspec(source.read_appspec(sha), settings.environ)
        if len(_SPECS) >= _SPECS_KEPT:
            _SPECS.clear()
        _SPECS[key] = spec
    return spec
