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
