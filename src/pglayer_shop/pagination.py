"""Keyset pagination: opaque cursors and the `limit`/`after` query parameters."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any, TypeVar

import orjson
from fastapi import Query
from pydantic import TypeAdapter, ValidationError

from pglayer.fastapi import Problem

__all__ = ["After", "Limit", "decode_cursor", "encode_cursor"]

T = TypeVar("T")

Limit = Annotated[int, Query(ge=1, le=100, description="Page size, 1..100")]
After = Annotated[
    str | None, Query(max_length=200, description="`next_cursor` of the previous page")
]


def encode_cursor(*key: Any) -> str:
    """An opaque cursor for the last row's sort key."""
    return base64.urlsafe_b64encode(orjson.dumps(key)).decode().rstrip("=")


def decode_cursor(cursor: str, key_type: TypeAdapter[T]) -> T:
    """The sort key in `cursor`; a cursor that is not ours is a 422."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        return key_type.validate_python(orjson.loads(raw))
    except (binascii.Error, ValueError, ValidationError, orjson.JSONDecodeError):
        raise Problem(
            422,
            "validation_error",
            "Invalid cursor: pass `next_cursor` of a previous page.",
            errors=[{"loc": ["query", "after"], "msg": "invalid cursor", "type": "value_error"}],
        ) from None
