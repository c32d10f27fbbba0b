"""`pglayer.concurrent.gather`: results in order, a connection cap, cancellation on failure."""

from __future__ import annotations

import asyncio
from typing import Any, assert_type

import asyncpg
import pytest

from pglayer import Connection, Database, ProgrammingError
from pglayer._concurrent import gather
from tests.conftest import backends, settings_for, wait_for


async def test_results_come_back_in_order(db: Database) -> None:
    async def one(conn: Connection) -> int:
        return int(await conn.fetchval("SELECT 1 FROM pg_sleep(0.05)"))

    async def two(conn: Connection) -> str:
        return str(await conn.fetchval("SELECT 'two'"))

    assert await gather(db, one, two) == (1, "two")


async def test_at_most_max_connections_are_held_at_once(db_url: str) -> None:
    held = 0
    peak = 0

    async def query(conn: Connection) -> None:
        nonlocal held, peak
        held += 1
        peak = max(peak, held)
        await conn.execute("SELECT pg_sleep(0.05)")
        held -= 1

    async with Database(settings_for(db_url, max_size=4)) as db:
        await gather(db, query, query, query, max_connections=2)
        assert db.stats().acquisitions == 3
    assert peak == 2


async def test_one_failure_cancels_the_others_and_releases_everything(
    db_url: str, admin: asyncpg.Connection[Any], db_name: str
) -> None:
    async def slow(conn: Connection) -> None:
        await conn.execute("SELECT pg_sleep(30)")

    async def broken(conn: Connection) -> None:
        await asyncio.sleep(0.2)  # let the slow one start on the server
        await conn.fetch("SELECT * FROM no_such_table")

    async with Database(settings_for(db_url, max_size=4, retry_attempts=1)) as db:
        with pytest.raises(ProgrammingError):
            await gather(db, slow, broken, slow)

        async def released() -> bool:
            busy = [b for b in await backends(admin, db_name) if b["state"] != "idle"]
            return not busy and db.stats().in_use == 0

        assert await wait_for(released, timeout=3)


async def test_gather_keeps_each_results_type(db: Database) -> None:
    async def number(conn: Connection) -> int:
        return int(await conn.fetchval("SELECT 1"))

    async def word(conn: Connection) -> str:
        return str(await conn.fetchval("SELECT 'a'"))

    result = await gather(db, number, word, number, word)
    assert_type(result, tuple[int, str, int, str])  # checked by mypy
    assert result == (1, "a", 1, "a")
