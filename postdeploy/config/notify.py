"""Notification settings: Apprise URLs and events, checked at start, shown masked.

Apart from :mod:`postdeploy.notify` because :mod:`postdeploy.config.settings` needs it,
and config sits below the state and task modules that sending needs.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import apprise

from postdeploy.config.redaction import MASK
from postdeploy.errors import ConfigError

# Run statuses worth a message, plus "recovered": the first success after a
# failure that was notified.
NOTIFY_EVENTS = ("failed", "timed_out", "error", "lost", "cancelled", "succeeded", "recovered")
DEFAULT_NOTIFY_ON = frozenset({"failed", "timed_out", "error", "lost", "recovered"})
# Cap on one request's connect and read timeouts (Apprise's default is 4 s): a
# receiver that hangs must not hold a worker process for long.
MAX_SOCKET_TIMEOUT = 10.0

_SCHEME = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://")
# Commas and semicolons separate URLs only before the next "scheme://": a URL's own
# query may hold commas (mailto://...?to=a@x.org,b@x.org), as Apprise splits them.
_NEXT_URL = re.compile(r"[,;]+(?=[A-Za-z][A-Za-z0-9+.-]*://)")
_EVENT_SPLIT = re.compile(r"[,\s]+")


def parse_urls(raw: Any, where: str) -> tuple[str, ...]:
    """URLs from a string (comma- or space-separated) or a list; each one checked.

    Raises ConfigError starting with ``where`` ("invalid POSTDEPLOY_NOTIFY") and
    naming the (masked) URL that is wrong.
    """
    if raw is None:
        return ()
    if isinstance(raw, str):
        values = [raw]
    elif isinstance(raw, list) and all(isinstance(v, str) for v in raw):
        values = list(raw)
    else:
        raise ConfigError(f"{where}: give an Apprise URL or a list of them")
    urls: list[str] = []
    for value in values:
        for word in value.split():
            urls += [u.strip(",;") for u in _NEXT_URL.split(word) if u.strip(",;")]
    for url in urls:
        check_url(url, where)
    return tuple(dict.fromkeys(urls))


def check_url(url: str, where: str) -> None:
    """ConfigError unless Apprise can send to ``url``."""
    match = _SCHEME.match(url)
    if match is None:
        raise ConfigError(f"{where}: an entry has no 'scheme://', so it is not a URL "
                          "(not shown: it may hold a token); give Apprise URLs such as "
                          "json://host/path or slack://tokenA/tokenB/tokenC")
    scheme = match.group("scheme").lower()
    with quiet_apprise():
        known = _supported(scheme)
        plugin = apprise.Apprise.instantiate(url) if known else None
    if not known:
        raise ConfigError(f"{where}: {mask_url(url)!r}: Apprise has no service "
                          f"'{scheme}://'; check the URL's scheme against Apprise's list "
                          "of services")
    if plugin is None:
        raise ConfigError(f"{where}: {mask_url(url)!r} is not a valid "
                          f"'{scheme}://' URL for Apprise; check its format")


def parse_events(raw: Any, where: str = "invalid POSTDEPLOY_NOTIFY_ON") -> frozenset[str]:
    """The events to notify, from "failed,timed_out ..." (default when unset)."""
    if raw is None or raw == "":
        return DEFAULT_NOTIFY_ON
    words = raw if isinstance(raw, list) else _EVENT_SPLIT.split(str(raw))
    events = {str(w).strip().lower() for w in words if str(w).strip()}
    for event in sorted(events):
        if event not in NOTIFY_EVENTS:
            raise ConfigError(f"{where}: {event!r} is not an event; "
                              f"use some of {', '.join(NOTIFY_EVENTS)}")
    if not events:
        raise ConfigError(f"{where}: no events given; use some of "
                          f"{', '.join(NOTIFY_EVENTS)}, or unset POSTDEPLOY_NOTIFY")
    return frozenset(events)


def mask_url(url: str) -> str:
    """``url`` safe to show: scheme and host only, credentials hidden by Apprise's rules.

    The path and query are dropped: many services keep their tokens there.
    """
    match = _SCHEME.match(url)
    if match is None:
        return MASK
    plugin = None
    if _supported(match.group("scheme").lower()):
        with quiet_apprise():
            plugin = apprise.Apprise.instantiate(url)
    if plugin is None:
        return f"{match.group('scheme')}://{MASK}"
    shown = str(plugin.url(privacy=True)).split("?", 1)[0]  # type: ignore[no-untyped-call]
    scheme, _, rest = shown.partition("://")
    host, slash, path = rest.partition("/")
    return f"{scheme}://{host}{'/...' if slash and path.strip('/') else ''}"


def url_secrets(url: str, tokens: bool = True) -> set[str]:
    """Parts of a URL that must never be shown: the URL, its user-info and, for a
    notify URL (``tokens``), the token-like parts of its host, path and query."""
    found = {url}
    try:
        parts = urlsplit(url)
        userinfo, _, _ = parts.netloc.rpartition("@")
    except ValueError:
        return found
    if userinfo:
        found.add(userinfo)
        user, colon, password = userinfo.partition(":")
        # A password, or a user name that is a token (https://TOKEN@host); not a
        # plain user name such as "deploy", which would mask ordinary words.
        found.update(p for p in (password if colon else user,) if len(p) >= 4)
    if tokens:
        pieces = [parts.netloc.rpartition("@")[2], *parts.path.split("/"),
                  *(v for _, v in parse_qsl(parts.query))]
        found.update(p for p in pieces if _looks_like_token(p))
    return found


def _looks_like_token(text: str) -> bool:
    # Tokens mix letters and digits; hostnames, IP addresses and path words do not.
    return (len(text) >= 8 and any(c.isdigit() for c in text)
            and any(c.isalpha() for c in text) and "." not in text)


def _supported(scheme: str) -> bool:
    # The plugin manager is a singleton that loads Apprise's plugins once per process.
    return scheme in apprise.NotificationManager()  # type: ignore[no-untyped-call]


@contextmanager
def quiet_apprise() -> Iterator[None]:
    """Keep Apprise's own log lines (which may show URLs) out of our logs meanwhile."""
    logger = logging.getLogger(apprise.LOGGER_NAME)
    propagate = logger.propagate
    logger.propagate = False
    try:
        yield
    finally:
        logger.propagate = propagate
