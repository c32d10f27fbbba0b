"""The `pglayer[sqlalchemy]` extra: an AsyncSession with pglayer's errors and commit timing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI, Response
from pydantic import BaseModel
from sqlalchemy import BigInteger, String, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from pglayer import Database
from pglayer.fastapi import setup
from pglayer.fastapi.sqlalchemy import SqlSession, setup_sqlalchemy
from pglayer.sqlalchemy import create_engine
from tests.conftest import asgi_client, settings_for
from tests.test_shop_users import assert_problem


class Base(DeclarativeBase):
    pass


class UserRow(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    email: Mapped[str] = mapped_column(String(254))


class NewUser(BaseModel):
    name: str
    email: str


@pytest.fixture
async def sa_client(db_url: str) -> AsyncIterator[httpx.AsyncClient]:
    settings = settings_for(db_url)
    app = FastAPI()
    setup(app, Database(settings))
    setup_sqlalchemy(app, create_engine(settings))

    @app.post("/sa/users", status_code=201)
    async def add_user(body: NewUser, session: SqlSession, response: Response) -> dict[str, int]:
        row = UserRow(name=body.name, email=body.email)
        session.add(row)
        await session.flush()
        await session.execute(text("INSERT INTO accounts (user_id) VALUES (:id)"), {"id": row.id})
        response.headers["Location"] = f"/users/{row.id}"
        return {"id": row.id}

    @app.post("/sa/deferred")
    async def deferred(session: SqlSession) -> dict[str, bool]:
        await session.execute(text("INSERT INTO sa_deferred VALUES (1), (1)"))
        return {"ok": True}

    async with app.router.lifespan_context(app), asgi_client(app) as client:
        yield client


async def test_a_sqlalchemy_route_commits_before_answering(
    sa_client: httpx.AsyncClient, db_url: str
) -> None:
    response = await sa_client.post("/sa/users", json={"name": "Ada", "email": "ada@example.com"})
    assert response.status_code == 201, response.text
    conn: asyncpg.Connection[Any] = await asyncpg.connect(db_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM accounts") == 1
    finally:
        await conn.close()


async def test_sqlalchemy_integrity_errors_become_pglayer_problems(
    sa_client: httpx.AsyncClient,
) -> None:
    await sa_client.post("/sa/users", json={"name": "Ada", "email": "ada@example.com"})
    response = await sa_client.post("/sa/users", json={"name": "Bob", "email": "ADA@example.com"})
    assert_problem(response, 409, "conflict")
    assert "sqlalchemy" not in response.text.lower()


async def test_a_failing_commit_through_sqlalchemy_is_not_a_2xx(
    sa_client: httpx.AsyncClient, db_url: str
) -> None:
    conn: asyncpg.Connection[Any] = await asyncpg.connect(db_url)
    try:
        await conn.execute("CREATE TABLE sa_deferred (k int UNIQUE DEFERRABLE INITIALLY DEFERRED)")
        response = await sa_client.post("/sa/deferred")
        assert_problem(response, 409, "conflict")
        assert await conn.fetchval("SELECT count(*) FROM sa_deferred") == 0
    finally:
        await conn.close()
