"""Keyset pagination: `limit`/`after` parameters and opaque, tamper-checked cursors.

A cursor is the last row's sort key, signed with a key only the server knows together with
the name of its list, so a client can pass it back to that list but not forge or alter one,
nor take it to another list: anything else is a 422 naming `after`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Generic, TypeVar

import orjson
from fastapi import Query
from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from pglayer._connection import Connection
from pglayer._database import Database
from pglayer._errors import ConfigurationError
from pglayer._json import default
from pglayer.fastapi._params import MAX_ID, DecimalInt
from pglayer.fastapi._problems import Problem

__all__ = ["After", "Cursors", "Limit", "Page"]

T = TypeVar("T")
K = TypeVar("K")

Limit = Annotated[
    int, Query(description="Page size, 1..100 (default 50)", examples=[50]), DecimalInt(1, 100)
]
"""The `limit` query parameter: 1..100 in plain decimal digits."""

After = Annotated[
    str | None,
    Query(
        min_length=1,
        max_length=512,
        description="`next_cursor` of the previous page; omit for the first",
    ),
]
"""The `after` query parameter: an opaque cursor from a previous page."""

_TAG = 16  # bytes of HMAC-SHA256 kept: forging one is a 2^-128 guess
# What `page_by_id` writes into its cursors, so anything else is a tampered cursor.
_ID_KEY = TypeAdapter(tuple[Annotated[int, Field(strict=True, ge=1, le=MAX_ID)]])


class Page(BaseModel, Generic[T]):
    """One page of a list: its items, and the cursor of the next page (null on the last)."""

    items: Annotated[list[T], Field(max_length=100)]  # `Limit`'s most
    next_cursor: str | None


def _invalid(reason: str) -> Problem:
    return Problem(
        422,
        "validation_error",
        "Invalid cursor: pass `next_cursor` of a previous page.",
        errors=[{"loc": ["query", "after"], "msg": reason, "type": "value_error"}],
    )


# The first process to ask makes the secret; the others read the one that won.
_CLAIM_SHARED = """
INSERT INTO pglayer_secrets (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING
"""
_READ_SHARED = "SELECT value FROM pglayer_secrets WHERE name = $1"


class Cursors:
    """Signs and checks cursors with `secret` (every worker of one app must share it)."""

    def __init__(self, secret: str | bytes) -> None:
        raw = secret.encode() if isinstance(secret, str) else secret
        if not raw.strip():
            # An empty variable (`PGLAYER_CURSOR_SECRET=`): anyone could sign cursors.
            raise ConfigurationError("a cursor secret must not be empty or blank")
        self._key = hashlib.sha256(b"pglayer-cursor\0" + raw).digest()

    @classmethod
    async def from_database(cls, db: Database, *, name: str = "cursors") -> Cursors:
        """Cursors signed with a random secret kept in the database (`pglayer_secrets`, made
        by `install_pglayer_tables`), the same for every worker and every restart."""

        async def shared(conn: Connection) -> bytes:
            await conn.execute(_CLAIM_SHARED, name, secrets.token_bytes(32))
            value: bytes = await conn.fetchval(_READ_SHARED, name)
            return value

        # Read first (a replica has it too, and answers while the primary is down); made
        # on the primary only the first time.
        made: bytes | None = await db.read(lambda conn: conn.fetchval(_READ_SHARED, name))
        return cls(made if made is not None else await db.run_in_transaction(shared))

    def _tag(self, payload: bytes, of: str) -> bytes:
        name = of.encode()
        signed = len(name).to_bytes(4, "big") + name + payload
        return hmac.new(self._key, signed, hashlib.sha256).digest()[:_TAG]

    def encode(self, *key: Any, of: str = "") -> str:
        """An opaque cursor for a sort key of the list `of`: JSON values, or what pglayer's
        responses write (a UUID or a Decimal as its string, a datetime as ISO 8601), which
        `decode` turns back by its key type."""
        payload = orjson.dumps(key, default=default)
        token = self._tag(payload, of) + payload
        return base64.urlsafe_b64encode(token).decode().rstrip("=")

    def decode(self, cursor: str, key_type: TypeAdapter[K], *, of: str = "") -> K:
        """The sort key in `cursor`, a cursor of the list `of`, validated by `key_type`;
        anything else is a 422."""
        try:
            token = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        except (binascii.Error, ValueError):
            raise _invalid("not a cursor") from None
        # The decoder skips characters outside its alphabet and extra padding: only the
        # cursor as `encode` wrote it is taken.
        if base64.urlsafe_b64encode(token).rstrip(b"=") != cursor.encode():
            raise _invalid("not a cursor")
        tag, payload = token[:_TAG], token[_TAG:]
        if len(tag) < _TAG or not hmac.compare_digest(tag, self._tag(payload, of)):
            raise _invalid("not a cursor of this list")
        try:
            return key_type.validate_python(orjson.loads(payload))
        except (ValidationError, orjson.JSONDecodeError):
            raise _invalid("a cursor of another list") from None

    async def page_by_id(
        self, db: Database, query: str, limit: int, after: str | None, *, of: str | None = None
    ) -> dict[str, Any]:
        """One page of the list `of` (default: named by `query`) in id order: `query` takes
        the last id seen (`$1`, 0 for the first page) and how many rows to fetch (`$2`), and
        selects `id` among its columns."""
        name = query if of is None else of
        after_id = self.decode(after, _ID_KEY, of=name)[0] if after else 0
        rows = await db.read(lambda conn: conn.fetch(query, after_id, limit + 1))
        return self.page(rows, limit, lambda row: (row["id"],), of=name)

    def page(
        self, rows: Sequence[T], limit: int, key: Callable[[T], Sequence[Any]], *, of: str = ""
    ) -> dict[str, Any]:
        """`{"items", "next_cursor"}` of the list `of`, from up to `limit + 1` rows fetched
        in key order."""
        if len(rows) <= limit:
            return {"items": list(rows), "next_cursor": None}
        cursor = self.encode(*key(rows[limit - 1]), of=of)
        return {"items": list(rows[:limit]), "next_cursor": cursor}
