"""The ceiling: bare FastAPI routes that read with asyncpg and answer pre-serialised bytes.

No dependency, no middleware, no deadline, no error mapping: what any FastAPI app can reach
on these reads. The routes still declare their response models, as a real app would.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import asyncpg
import orjson
from fastapi import FastAPI, HTTPException, Response
from pydantic import BaseModel

from benchmarks.queries import DASHBOARD_JSON_SQL, USER_SQL

pool: Any = None


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    global pool
    pool = await asyncpg.create_pool(os.environ["DATABASE_URL"], min_size=10, max_size=10)
    yield
    await pool.close()


app = FastAPI(lifespan=lifespan)


class User(BaseModel):
    id: int
    name: str
    email: str
    created_at: datetime


@app.get("/users/{user_id}", response_model=User)
async def get_user(user_id: int) -> Response:
    row = await pool.fetchrow(USER_SQL, user_id)
    if row is None:
        raise HTTPException(404, "not found")
    return Response(orjson.dumps(dict(row)), media_type="application/json")


@app.get("/dashboard/{user_id}")
async def dashboard(user_id: int) -> Response:
    body = await pool.fetchval(DASHBOARD_JSON_SQL, user_id)
    if body is None:
        raise HTTPException(404, "not found")
    return Response(body.encode(), media_type="application/json")
