"""Hide credentials and secrets before anything is logged, stored or shown."""

from __future__ import annotations

import re
from collections.abc import Iterable

# scheme://user:password@host  or  scheme://token@host
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@")
MASK = "***"


def redact_url(text: str) -> str:
    """Replace the user-info part of every URL in ``text`` with ``***``."""
    return _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}{MASK}@", text)


def mask_secrets(text: str, secrets: Iterable[str]) -> str:
    """Replace every occurrence of each secret value (and URL credentials) with ``***``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
    return redact_url(text)


def url_credentials(url: str) -> list[str]:
    """The secret parts of a URL's user-info (password or token, and the pair as written).

    The executor masks these in job output like SECRET values: a job must not be able
    to print the Redis password or a repo token it found somewhere.
    """
    found: list[str] = []
    for match in _URL_USERINFO.finditer(url):
        userinfo = match.group("userinfo")
        user, _, password = userinfo.partition(":")
        found.append(userinfo)
        # A bare token (https://TOKEN@host) is the secret itself; a user name is not.
        found.append(password if password else user)
    return [value for value in found if len(value) >= MIN_SECRET_LENGTH]


MIN_SECRET_LENGTH = 4  # shorter values would mask common words all over the output
