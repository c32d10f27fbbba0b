"""Answers serialised once: rows straight to JSON bytes, or JSON that PostgreSQL built.

A handler that returns a Pydantic model has it validated and serialised again by FastAPI
against the route's response model. Returning `json_response(...)` skips both; declare
`response_model=` on the route so OpenAPI still describes the body, and make sure the
rows match it (the route's tests are where that is checked)::

    @router.get("/users/{user_id}", response_model=User)
    async def get_user(user_id: int, db: Db) -> Response:
        row = await db.read(lambda c: c.fetchrow("SELECT id, name FROM users WHERE id = $1",
                                                 user_id))
        return json_response(row)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from starlette.responses import Response

from pglayer._json import OPTIONS, default

__all__ = ["json_bytes", "json_response"]


def json_bytes(content: Any) -> bytes:
    """`content` as JSON: records, mappings, lists, models, Decimals (as strings), datetimes.

    `str` or `bytes` are taken to be JSON already (say, built by PostgreSQL) and pass as
    they are.
    """
    if isinstance(content, bytes):
        return content
    if isinstance(content, str):
        return content.encode()
    # orjson directly, not `_json.dumps`: one call less on every response.
    return orjson.dumps(content, default=default, option=OPTIONS)


def json_response(
    content: Any, *, status_code: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    """An `application/json` response of `content`, serialised once (see `json_bytes`)."""
    return Response(json_bytes(content), status_code, headers, media_type="application/json")
