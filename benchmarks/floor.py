"""The floor: bare Starlette + asyncpg + orjson doing the shop's reads, and nothing else.

No validation beyond parsing the id, no middleware, no error mapping: what the framework
and driver cost at the least. The shop is measured against it.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from benchmarks.queries import DASHBOARD_SQL, USER_SQL

pool: Any = None


async def _init(conn: Any) -> None:
    await conn.set_type_codec(
        "json",
        encoder=lambda v: orjson.dumps(v).decode(),
        decoder=orjson.loads,
        schema="pg_catalog",
    )


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    global pool
    pool = await asyncpg.create_pool(
        os.environ["DATABASE_URL"], min_size=10, max_size=10, init=_init
    )
    yield
    await pool.close()


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status, media_type="application/json")


async def user(request: Request) -> Response:
    row = await pool.fetchrow(USER_SQL, int(request.path_params["user_id"]))
    if row is None:
        return _json({"status": 404}, 404)
    return _json(dict(row))


async def dashboard(request: Request) -> Response:
    row = await pool.fetchrow(DASHBOARD_SQL, int(request.path_params["user_id"]))
    if row is None:
        return _json({"status": 404}, 404)
    return _json(
        {
            "user": {k: row[k] for k in ("id", "name", "email", "created_at")},
            "recent_orders": row["recent_orders"],
            "balance": str(row["balance"]),
        }
    )


app = Starlette(
    routes=[Route("/users/{user_id}", user), Route("/dashboard/{user_id}", dashboard)],
    lifespan=lifespan,
)
