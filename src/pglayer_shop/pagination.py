"""Keyset pagination: opaque cursors and the `limit`/`after` query parameters."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any, TypeVar

import orjson
from fastapi import Query
from pydantic import BaseModel, TypeAdapter, ValidationError

from pglayer import Database
from pglayer.fastapi import Problem
from pglayer_shop.models import Page

__all__ = ["After", "Limit", "decode_cursor", "encode_cursor", "page_by_id"]

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)
_ID_CURSOR = TypeAdapter(tuple[int])

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


async def page_by_id(
    db: Database, model: type[M], columns: str, table: str, limit: int, after: str | None
) -> Page[M]:
    """One page of `table` in id order, as `model`s, after the cursor `after`."""
    after_id = decode_cursor(after, _ID_CURSOR)[0] if after else 0
    rows = await db.read(
        lambda conn: conn.fetch_all(
            model,
            f"SELECT {columns} FROM {table} WHERE id > $1 ORDER BY id LIMIT $2",
            after_id,
            limit + 1,
        )
    )
    if len(rows) <= limit:
        return Page(items=rows, next_cursor=None)
    last_id = rows[limit - 1].model_dump(include={"id"})["id"]
    return Page(items=rows[:limit], next_cursor=encode_cursor(last_id))
