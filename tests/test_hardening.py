"""Findings of the outside audit in the library's correctness (issue 13, items 1-8)."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from pglayer import (
    CommitIndeterminateError,
    ConnectionLostError,
    Database,
    TransientError,
    retry,
)
from tests.conftest import settings_for

TABLE = "CREATE TABLE IF NOT EXISTS notes (id serial PRIMARY KEY, body text NOT NULL)"


async def _kill_own_backend(conn: Any, admin: asyncpg.Connection[Any]) -> None:
    pid = await conn.fetchval("SELECT pg_backend_pid()")
    await admin.execute("SELECT pg_terminate_backend($1)", pid)
    await asyncio.sleep(0.2)  # the driver sees the socket close before COMMIT is sent


async def test_a_connection_lost_before_commit_is_sent_is_replayed(
    db: Database, admin: asyncpg.Connection[Any], caplog: pytest.LogCaptureFixture
) -> None:
    await db.run(lambda conn: conn.execute(TABLE))
    attempts = 0

    async def body(conn: Any) -> int:
        nonlocal attempts
        attempts += 1
        await conn.execute("INSERT INTO notes (body) VALUES ('x')")
        if attempts == 1:
            await _kill_own_backend(conn, admin)
        return attempts

    retry.set_testing(True)
    try:
        assert await db.run_in_transaction(body) == 2
    finally:
        retry.set_testing(False)
    assert await db.run(lambda conn: conn.fetchval("SELECT count(*) FROM notes")) == 1
    assert "outcome unknown" not in caplog.text


async def test_a_connection_lost_before_commit_without_retry_is_a_lost_connection(
    db: Database, admin: asyncpg.Connection[Any]
) -> None:
    await db.run(lambda conn: conn.execute(TABLE))

    async def body(conn: Any) -> None:
        await conn.execute("INSERT INTO notes (body) VALUES ('x')")
        await _kill_own_backend(conn, admin)

    with pytest.raises(ConnectionLostError):
        await db.run_in_transaction(body, retry=False)
    assert await db.run(lambda conn: conn.fetchval("SELECT count(*) FROM notes")) == 0


def test_an_unknown_commit_outcome_is_not_transient() -> None:
    assert not issubclass(CommitIndeterminateError, TransientError)
    assert not retry.is_retryable(CommitIndeterminateError())
