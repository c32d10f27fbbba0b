"""Keyset pagination: opaque cursors and the `limit`/`after` query parameters."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any, TypeVar

import orjson
from fastapi import Query
from pydantic import Field, TypeAdapter, ValidationError

from pglayer import Database
from pglayer.fastapi import Problem, field_error
from pglayer_shop.models import MAX_ID, DecimalInt

__all__ = ["After", "CursorId", "Limit", "decode_cursor", "encode_cursor", "page", "page_by_id"]

T = TypeVar("T")
CursorId = Annotated[int, Field(strict=True, ge=1, le=MAX_ID)]
"""An id inside a cursor: what we wrote there, so anything else is a tampered cursor."""
_ID_CURSOR = TypeAdapter(tuple[CursorId])

Limit = Annotated[int, Query(description="Page size, 1..100"), DecimalInt(1, 100)]
After = Annotated[
    str | None, Query(max_length=200, description="`next_cursor` of the previous page")
]


def encode_cursor(*key: Any) -> str:
    """An opaque cursor for the last row's sort key."""
    return base64.urlsafe_b64encode(orjson.dumps(key)).decode().rstrip("=")


def decode_cursor(cursor: str, key_type: TypeAdapter[T]) -> T:
    """The sort key in `cursor`; a cursor that is not ours (or out of range) is a 422."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        return key_type.validate_python(orjson.loads(raw))
    except (binascii.Error, ValueError, ValidationError, orjson.JSONDecodeError):
        raise Problem(
            422,
            "validation_error",
            "Invalid cursor: pass `next_cursor` of a previous page.",
            errors=[field_error(["query", "after"], "not a cursor this API issued")],
        ) from None


def page(rows: list[Any], limit: int, key: Any) -> dict[str, Any]:
    """`{"items", "next_cursor"}` from up to `limit + 1` rows; `key(row)` is the sort key."""
    if len(rows) <= limit:
        return {"items": rows, "next_cursor": None}
    return {"items": rows[:limit], "next_cursor": encode_cursor(*key(rows[limit - 1]))}


async def page_by_id(
    db: Database, columns: str, table: str, limit: int, after: str | None
) -> dict[str, Any]:
    """One page of `table` in id order (rows as records), after the cursor `after`."""
    after_id = decode_cursor(after, _ID_CURSOR)[0] if after else 0
    rows = await db.read(
        lambda conn: conn.fetch(
            f"SELECT {columns} FROM {table} WHERE id > $1 ORDER BY id LIMIT $2",
            after_id,
            limit + 1,
        )
    )
    return page(rows, limit, lambda row: (row["id"],))
