"""Masking of connection strings, so that no password reaches a log line or an error."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

__all__ = ["describe_target", "host_ports", "mask_dsn", "mask_text"]

_MASK = "***"
# key=value DSNs (libpq style) and URL query parameters may carry the password too.
_PASSWORD_PARAM = re.compile(r"(?i)(password\s*=\s*)('[^']*'|[^\s&]*)")


# Any URL with a password in it, wherever it appears in free text: up to its last `@`, for a
# password may hold a `/`, `#`, `?` or `@` its writer did not percent-encode.
_URL_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^\s:/@]*):\S*@")
# A PostgreSQL URL's password may even hold a space the driver takes: up to the line's next `@`.
_PG_URL_PASSWORD = re.compile(r"(?i)\b(postgres(?:ql)?(?:\+[a-z0-9]+)?://[^\s:/@]*):[^@\n]*@")


def mask_text(text: str) -> str:
    """Return `text` with the password of every URL or `password=` parameter masked."""
    if "@" not in text and "assword" not in text and "ASSWORD" not in text:
        return text
    text = _PG_URL_PASSWORD.sub(rf"\g<1>:{_MASK}@", text)
    text = _URL_PASSWORD.sub(rf"\g<1>:{_MASK}@", text)
    return _PASSWORD_PARAM.sub(rf"\g<1>{_MASK}", text)


def _userinfo(dsn: str) -> tuple[str, str, str, str] | None:
    """A URL's scheme, user, password (or "") and what follows its userinfo, taking the
    userinfo up to the last `@`: a URL parser ends it at the first `/`, `?` or `#`, which an
    unencoded password may hold. None for a URL without userinfo, or not a URL."""
    scheme, found, rest = dsn.partition("://")
    if not found or "@" not in rest:
        return None
    userinfo, _, after = rest.rpartition("@")
    user, _, password = userinfo.partition(":")
    return scheme, user, password, after


def mask_dsn(dsn: str) -> str:
    """Return `dsn` with any password replaced by `***`."""
    split = _userinfo(dsn)
    if split is None:
        return _PASSWORD_PARAM.sub(rf"\g<1>{_MASK}", dsn)
    scheme, user, password, after = split
    userinfo = f"{user}:{_MASK}" if password else user
    after = _PASSWORD_PARAM.sub(rf"\g<1>{_MASK}", after)
    return f"{scheme}://{userinfo}@{after}"


def host_ports(url: str) -> list[tuple[str, str]]:
    """Each host of a URL (libpq's `host1:5432,host2:5433` form included) with its port as
    written, "" where it names none."""
    authority = url.partition("://")[2].split("/", 1)[0].split("?", 1)[0].rpartition("@")[2]
    pairs = []
    for host in authority.split(","):
        after = host.rpartition("]")[2]  # an IPv6 literal's colons are not a port's
        pairs.append((host, after.rpartition(":")[2] if ":" in after else ""))
    return pairs


def describe_target(dsn: str) -> str:
    """Return `user@host:port/database` for messages; never includes a password."""
    split = _userinfo(dsn)
    plain = dsn if split is None else f"{split[0]}://{split[3]}"  # no userinfo left to misread
    try:
        parts = urlsplit(plain)
        host = parts.hostname or "localhost"
        port = parts.port or 5432
    except ValueError:
        return mask_dsn(dsn)
    user = split[1] if split is not None else parts.username or ""
    database = parts.path.lstrip("/") or user
    prefix = f"{user}@" if user else ""
    return f"{prefix}{host}:{port}/{database}"
