"""The `Idempotency-Key` request header, as a handler parameter type."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Header
from pydantic import BeforeValidator, StringConstraints

__all__ = ["IdempotencyKey"]


def _field_value(value: Any) -> Any:
    # RFC 9110: the whitespace around a field's value is not part of it. The parser drops
    # what comes before; a space after made another key, and a resend was made twice.
    return value.strip(" \t") if isinstance(value, str) else value


# Printable ASCII, space included: no control characters, and nothing a server would
# decode as Latin-1 and count in bytes. On the string, not the optional: there its bounds
# were said of "items", and OpenAPI left them out.
_Key = Annotated[
    str, StringConstraints(min_length=1, max_length=200, pattern=r"^[\x20-\x7E]{1,200}$")
]

IdempotencyKey = Annotated[
    _Key | None,
    BeforeValidator(_field_value),
    Header(
        alias="Idempotency-Key",
        description="1..200 printable ASCII characters (0x20-0x7E). Send the same key again"
        " to get the same answer back; the work is done once",
    ),
]
"""An optional `Idempotency-Key` header: 1..200 printable ASCII characters, else 422."""
