"""A job's environment: what it sees of the executor's, and what it must never print.

The executor's own settings (``POSTDEPLOY_*``, ``FLOWER_*``) are hidden from
every job, and from the variables a readiness gate's URL may name.
"""

from __future__ import annotations

from collections.abc import Mapping

from postdeploy.config.settings import Settings
from postdeploy.run.sandbox import JobPlace, job_user_env
from postdeploy.store.records import RunRecord

HIDDEN_FROM_JOBS = ("POSTDEPLOY_", "FLOWER_")  # the executor's own settings, not the app's


def job_environment(environ: Mapping[str, str], app_env: Mapping[str, str], app: str,
                    sha: str) -> dict[str, str]:
    """What a job's ``$VAR`` sees (the run adds its own id and trigger on top)."""
    env = {k: v for k, v in environ.items() if not k.startswith(HIDDEN_FROM_JOBS)}
    env.update(app_env)
    env.update({"COMMIT_SHA": sha, "POST_DEPLOY_APP": app})
    return env


def run_environment(settings: Settings, app_env: Mapping[str, str], record: RunRecord,
                    place: JobPlace) -> dict[str, str]:
    """The environment one run's job starts with: the executor's (less its own
    settings), the job user's, the appspec's, then the run's own variables."""
    env = {k: v for k, v in settings.environ.items() if not k.startswith(HIDDEN_FROM_JOBS)}
    env.update(job_user_env(place))
    env.update(app_env)
    env.update({"COMMIT_SHA": record.sha, "POST_DEPLOY_APP": record.app,
                "POST_DEPLOY_RUN_ID": record.id, "POST_DEPLOY_TRIGGER": record.trigger,
                # Empty for the app's first deployment (and a commit never deployed).
                "POST_DEPLOY_PREVIOUS_SHA": record.previous_sha or ""})
    return env
