"""The executor's secrets, in one list: what nothing postdeploy shows may contain.

Redis and repo credentials, notification URLs and their tokens, the webhook secret
and the commit status tokens. Job output, logs, run reasons, notifications and
commit statuses are all masked with this list (a job's own ``type: SECRET``
values are added per run).
"""

from __future__ import annotations

from postdeploy.config.notify import url_secrets
from postdeploy.config.redaction import MIN_SECRET_LENGTH, url_credentials
from postdeploy.config.settings import Settings


def executor_secrets(settings: Settings, broker_url: str | None = None) -> list[str]:
    """Every secret the executor knows, longest first (a whole URL is masked before
    the token inside it). ``broker_url``: the Redis URL actually in use, when it is
    not the configured one (the embedded Redis of `up`)."""
    found: set[str] = set()
    for url in (settings.redis_url, broker_url, *(a.repo for a in settings.apps)):
        if url and "://" in url:
            found |= url_secrets(url, tokens=False)
            found.update(url_credentials(url))
    for url in (*settings.notify, *(u for a in settings.apps for u in a.notify)):
        found |= url_secrets(url)
        found.update(url_credentials(url))
    if settings.webhook_secret:
        found.add(settings.webhook_secret)
    for name in {a.commit_status.token_env for a in settings.apps if a.commit_status}:
        if token := settings.environ.get(name):
            found.add(token)
    return sorted((s for s in found if len(s) >= MIN_SECRET_LENGTH), key=len, reverse=True)
