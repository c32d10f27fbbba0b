"""Masking of connection strings, so that no password reaches a log line or an error."""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

__all__ = ["describe_target", "mask_dsn", "mask_text"]

_MASK = "***"
# key=value DSNs (libpq style) and URL query parameters may carry the password too.
_PASSWORD_PARAM = re.compile(r"(?i)(password\s*=\s*)('[^']*'|[^\s&]*)")


# Any URL with a password in it, wherever it appears in free text.
_URL_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^\s:/@]*):[^\s@/]*@")


def mask_text(text: str) -> str:
    """Return `text` with the password of every URL or `password=` parameter masked."""
    if "@" not in text and "assword" not in text and "ASSWORD" not in text:
        return text
    text = _URL_PASSWORD.sub(rf"\g<1>:{_MASK}@", text)
    return _PASSWORD_PARAM.sub(rf"\g<1>{_MASK}", text)


def mask_dsn(dsn: str) -> str:
    """Return `dsn` with any password replaced by `***`."""
    try:
        parts = urlsplit(dsn)
    except ValueError:
        return _PASSWORD_PARAM.sub(rf"\g<1>{_MASK}", dsn)
    if not parts.scheme or not parts.netloc:
        return _PASSWORD_PARAM.sub(rf"\g<1>{_MASK}", dsn)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostinfo = netloc.rpartition("@")
        if ":" in userinfo:
            user = userinfo.split(":", 1)[0]
            netloc = f"{user}:{_MASK}@{hostinfo}"
    query = _PASSWORD_PARAM.sub(rf"\g<1>{_MASK}", parts.query)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def describe_target(dsn: str) -> str:
    """Return `user@host:port/database` for messages; never includes a password."""
    try:
        parts = urlsplit(dsn)
        host = parts.hostname or "localhost"
        port = parts.port or 5432
    except ValueError:
        return mask_dsn(dsn)
    user = parts.username or ""
    database = parts.path.lstrip("/") or user
    prefix = f"{user}@" if user else ""
    return f"{prefix}{host}:{port}/{database}"
