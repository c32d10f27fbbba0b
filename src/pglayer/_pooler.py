"""PgBouncer and other transaction poolers: detection, and what pglayer must change for them.

Behind a pooler in transaction mode a client's consecutive transactions may run on
different server connections, so anything session-scoped breaks: named prepared
statements (unless PgBouncer >= 1.21 tracks them with `max_prepared_statements`),
session `SET`, `LISTEN`, session advisory locks. PgBouncer also rejects startup parameters
it does not know, such as `statement_timeout`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import asyncpg

from pglayer._settings import DatabaseSettings

__all__ = ["PoolerInfo", "detect_pooler", "server_timeouts", "timeouts_off"]

_SERVER_TIMEOUTS = """
SELECT name, setting::bigint AS ms FROM pg_settings
 WHERE name IN ('statement_timeout', 'lock_timeout', 'idle_in_transaction_session_timeout')
"""


async def server_timeouts(conn: Any) -> dict[str, int]:
    """The server's own timeouts (ms), which apply where a transaction pooler drops what is
    sent at connect."""
    return {row["name"]: row["ms"] for row in await conn.fetch(_SERVER_TIMEOUTS)}


def timeouts_off(settings: DatabaseSettings, server_ms: Mapping[str, int]) -> dict[str, float]:
    """The server-side timeouts whose value there is not the configured one: name, seconds."""
    wanted = {
        "statement_timeout": settings.statement_timeout,
        "lock_timeout": settings.lock_timeout,
        "idle_in_transaction_session_timeout": settings.idle_in_transaction_timeout,
    }
    return {n: s for n, s in wanted.items() if server_ms.get(n) != round(s * 1000)}


PoolMode = Literal["none", "session", "transaction", "statement"]


@dataclass(frozen=True, slots=True)
class PoolerInfo:
    mode: PoolMode
    prepared_statements: bool  # whether named prepared statements survive it


async def connect_plain(dsn: str, settings: DatabaseSettings, **kwargs: Any) -> Any:
    return await asyncpg.connect(
        dsn,
        timeout=settings.connect_timeout,
        statement_cache_size=kwargs.pop("statement_cache_size", 0),
        server_settings={"application_name": f"{settings.application_name}-doctor"},
        **kwargs,
    )


async def pool_mode(dsn: str, settings: DatabaseSettings) -> PoolMode:
    """`transaction`, `session` or `statement`: how a pooler hands out server connections."""
    first = await connect_plain(dsn, settings)
    second = await connect_plain(dsn, settings)
    try:
        try:
            async with first.transaction():
                await first.execute("SELECT 1")
                await first.execute("SELECT 2")
        except asyncpg.PostgresError:
            return "statement"  # multi-statement transactions are refused
        async with first.transaction():
            pid = await first.fetchval("SELECT pg_backend_pid()")
        # A transaction pooler gives the server connection `first` just released to the
        # next client (PgBouncer reuses the most recent one); a session pooler cannot.
        async with second.transaction():
            other = await second.fetchval("SELECT pg_backend_pid()")
        return "transaction" if other == pid else "session"
    finally:
        await asyncio.gather(first.close(), second.close(), return_exceptions=True)


async def prepared_statements_safe(dsn: str, settings: DatabaseSettings) -> bool:
    """Whether asyncpg's named prepared statements survive the pooler (PgBouncer ≥ 1.21)."""
    conns = [await connect_plain(dsn, settings, statement_cache_size=100) for _ in range(2)]
    first, holder = conns
    query = "SELECT $1::int + 0 * pg_backend_pid()"
    safe = True
    try:
        async with first.transaction():
            await first.fetchval(query, 1)  # prepared on the server connection S1
        # `holder` takes S1 and keeps it, so `first` must run its cached statement on
        # another server connection, where only a pooler that tracks statements has it.
        async with holder.transaction():
            await holder.execute("SELECT 1")
            async with first.transaction():
                await first.fetchval(query, 2)
    except asyncpg.PostgresError:
        safe = False
    finally:
        await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)
    return safe


async def detect_pooler(settings: DatabaseSettings) -> PoolerInfo:
    """Whether a pooler sits in front of the server (its port differs), and its mode."""
    dsn = settings.dsn()
    conn = await connect_plain(dsn, settings)
    try:
        server_port = await conn.fetchval("SELECT inet_server_port()")
    finally:
        await conn.close()
    port = urlsplit(dsn).port or 5432
    if server_port is None or server_port == port:
        return PoolerInfo("none", prepared_statements=True)
    mode = await pool_mode(dsn, settings)
    if mode != "transaction":
        return PoolerInfo(mode, prepared_statements=mode == "session")
    return PoolerInfo(mode, prepared_statements=await prepared_statements_safe(dsn, settings))
