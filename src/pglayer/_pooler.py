"""PgBouncer and other transaction poolers: detection, and what pglayer must change for them.

Behind a pooler in transaction mode a client's consecutive transactions may run on
different server connections, so anything session-scoped breaks: named prepared
statements (unless PgBouncer >= 1.21 tracks them with `max_prepared_statements`),
session `SET`, `LISTEN`, session advisory locks. PgBouncer also rejects startup parameters
it does not know, such as `statement_timeout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

import asyncpg

from pglayer._dsn import host_ports
from pglayer._settings import DatabaseSettings

__all__ = [
    "PoolerInfo",
    "bounded_transaction",
    "connected_through_pooler",
    "detect_pooler",
    "dsn_ports",
    "pooled",
    "server_timeouts",
    "settings_off",
]

# `reset_val`: the session's own value (the role's and database's), not one a `SET LOCAL`
# (doctor's own bound) or a session `SET` leaked by another client of a pooler put over it.
_SERVER_TIMEOUTS = """
SELECT name, CASE WHEN name = 'jit' THEN (reset_val = 'on')::int ELSE reset_val::bigint END AS ms
  FROM pg_settings
 WHERE name IN ('statement_timeout', 'lock_timeout', 'idle_in_transaction_session_timeout', 'jit')
"""


async def server_timeouts(conn: Any) -> dict[str, int]:
    """The server's own timeouts (ms) and `jit` (1 or 0), which apply where a transaction
    pooler drops what is sent at connect."""
    return {row["name"]: row["ms"] for row in await conn.fetch(_SERVER_TIMEOUTS)}


def settings_off(
    settings: DatabaseSettings, server_ms: Mapping[str, int]
) -> dict[str, tuple[str, str]]:
    """The server's own timeouts and `jit` that are not the configured ones: for each, what
    it is there against what is configured, and the configured value as SQL writes it."""
    off: dict[str, tuple[str, str]] = {}
    for name, seconds in {
        "statement_timeout": settings.statement_timeout,
        "lock_timeout": settings.lock_timeout,
        "idle_in_transaction_session_timeout": settings.idle_in_transaction_timeout,
    }.items():
        if server_ms.get(name) != round(seconds * 1000):
            said = f"{name} {server_ms.get(name)}ms (configured {seconds:g}s)"
            off[name] = (said, f"'{seconds * 1000:g}ms'")
    wanted, there = ("on", "off") if settings.jit else ("off", "on")
    if server_ms.get("jit", int(settings.jit)) != int(settings.jit):
        off["jit"] = (f"jit {there} (configured {wanted})", wanted)
    return off


def pooled(dsn: str, server_port: int | None, backend_pid: int, login_pid: int) -> bool:
    """Whether something sits between `dsn` and the server: the server says another port
    than any of the URL's hosts (libpq's `host1:5432,host2:5433` form included), or another
    backend than the one the login named (a pooler hands out cancel keys of its own, so it
    shows on the server's own port too, and on a Unix socket)."""
    if backend_pid != login_pid:
        return True
    return server_port is not None and server_port not in dsn_ports(dsn)


_SERVER_SIDE = "SELECT inet_server_port() AS server_port, pg_backend_pid() AS backend_pid"


async def connected_through_pooler(conn: Any, dsn: str) -> bool:
    """`pooled()` for an open connection to `dsn` (one round trip)."""
    row = await conn.fetchrow(_SERVER_SIDE)
    return pooled(dsn, row["server_port"], row["backend_pid"], conn.get_server_pid())


def dsn_ports(dsn: str) -> list[int]:
    """The port of each of a URL's hosts, 5432 where it names none."""
    return [int(port) if port.isdigit() else 5432 for _, port in host_ports(dsn)]


PoolMode = Literal["none", "session", "transaction", "statement"]


@dataclass(frozen=True, slots=True)
class PoolerInfo:
    mode: PoolMode
    prepared_statements: bool  # whether named prepared statements survive it


class _Probe(asyncpg.Connection):  # generic only in the stubs
    """A probe's connection, whose statements and close are bounded too: behind a pooler
    whose server has just gone, a statement waits in the pooler's queue (PgBouncer's
    `query_wait_timeout`: 120 s by default), and `close()` for ever."""

    async def close(self, *, timeout: float | None = None) -> None:
        protocol: Any = self._protocol  # type: ignore[attr-defined]
        if protocol._is_cancelling():
            # A statement timed out: a graceful close would wait for its cancel request,
            # which a pooler without its server cannot pass on.
            self.terminate()
            return
        bound: float | None = self._config.command_timeout  # type: ignore[attr-defined]
        try:
            await super().close(timeout=timeout or bound)
        except Exception:
            self.terminate()


async def connect_plain(dsn: str, settings: DatabaseSettings, **kwargs: Any) -> Any:
    """A connection of its own for a check (no pool), every wait bounded by the connect
    timeout: a server that does not answer that soon is not reachable."""
    kwargs.setdefault("command_timeout", settings.connect_timeout)
    return await asyncpg.connect(
        dsn,
        timeout=settings.connect_timeout,
        statement_cache_size=kwargs.pop("statement_cache_size", 0),
        server_settings={"application_name": f"{settings.application_name}-doctor"},
        connection_class=_Probe,
        **kwargs,
    )


@asynccontextmanager
async def bounded_transaction(
    conn: Any, settings: DatabaseSettings, *, readonly: bool = False
) -> AsyncIterator[None]:
    """A check's transaction, bounded by its own `statement_timeout` and
    `idle_in_transaction_session_timeout` set in the message that begins it (`SET LOCAL`,
    which a transaction pooler keeps to this client): a role's tiny ones, which the checks
    report, must not end the checks' own work (1 ms of idleness ended the session between a
    separate BEGIN and SET)."""
    ms = math.ceil(settings.connect_timeout * 1000)
    await conn.execute(
        f"BEGIN{' READ ONLY' if readonly else ''}; SET LOCAL statement_timeout = {ms};"
        f" SET LOCAL idle_in_transaction_session_timeout = {ms}"
    )
    try:
        yield
    except Exception:
        with contextlib.suppress(Exception):  # the connection may be gone: the caller says why
            await conn.execute("ROLLBACK")
        raise
    await conn.execute("COMMIT")


_ROUNDS = 12  # turns each of two clients takes in `pool_mode` (a few ms each)


async def pool_mode(dsn: str, settings: DatabaseSettings) -> PoolMode:
    """`transaction`, `session` or `statement`: how a pooler hands out server connections.

    A session pooler gives each client connection one server connection for its life, so
    neither sees another backend, nor the other's; a transaction pooler (PgBouncer reuses
    the server connection released last) soon shows one of them. Other clients of the pooler
    (another worker's probe, the app) can take that connection between two turns, so one
    turn proves nothing: several do."""
    first = await connect_plain(dsn, settings)
    second = await connect_plain(dsn, settings)
    try:
        try:
            async with bounded_transaction(first, settings):
                await first.execute("SELECT 2")
        except asyncpg.QueryCanceledError:
            raise
        except asyncpg.PostgresError:
            return "statement"  # multi-statement transactions are refused
        seen: dict[int, set[Any]] = {0: set(), 1: set()}
        for _ in range(_ROUNDS):
            for k, conn in enumerate((first, second)):
                async with bounded_transaction(conn, settings):
                    seen[k].add(await conn.fetchval("SELECT pg_backend_pid()"))
            if len(seen[0]) > 1 or len(seen[1]) > 1 or seen[0] & seen[1]:
                return "transaction"
        return "session"
    finally:
        await asyncio.gather(first.close(), second.close(), return_exceptions=True)


async def prepared_statements_safe(dsn: str, settings: DatabaseSettings) -> bool:
    """Whether asyncpg's named prepared statements survive a transaction pooler.

    A pooler that carries them across server connections (PgBouncer >= 1.21 with
    `max_prepared_statements`, pgcat, Odyssey) prepares them there under names of its own;
    one that passes them through (older PgBouncer) leaves the client's name on the one
    server connection it ran on. One transaction tells which, whoever else uses the pooler:
    a name of our own, unique, cannot be found on a server connection by chance."""
    # No statement cache: asyncpg would name its statements as every other probe's do
    # (__asyncpg_stmt_1__), and behind a pooler that passes names through they collide.
    conn = await connect_plain(dsn, settings)
    name = f"pglayer_probe_{secrets.token_hex(8)}"
    try:
        async with bounded_transaction(conn, settings):
            # Kept referenced: asyncpg closes a statement object that is collected.
            statement = await conn.prepare("SELECT 1", name=name)
            passed_through = await conn.fetchval(
                "SELECT count(*) FROM pg_prepared_statements WHERE name = $1", name
            )
            del statement
            if passed_through:
                await conn.execute(f"DEALLOCATE {name}")  # left on that server connection
    finally:
        await conn.close()
    return not passed_through


async def detect_pooler(settings: DatabaseSettings) -> PoolerInfo:
    """Whether a pooler sits in front of the server (see `pooled`), and its mode."""
    dsn = settings.dsn()
    conn = await connect_plain(dsn, settings)
    try:
        behind = await connected_through_pooler(conn, dsn)
    finally:
        await conn.close()
    if not behind:
        return PoolerInfo("none", prepared_statements=True)
    mode = await pool_mode(dsn, settings)
    if mode != "transaction":
        return PoolerInfo(mode, prepared_statements=mode == "session")
    return PoolerInfo(mode, prepared_statements=await prepared_statements_safe(dsn, settings))


async def resolve_pooler(settings: DatabaseSettings) -> PoolerInfo:
    """The pooler in front as `settings.pooler` says, probed where it says `auto`."""
    kind = settings.pooler
    if kind == "none":
        return PoolerInfo("none", prepared_statements=True)
    if kind == "pgbouncer-session":
        return PoolerInfo("session", prepared_statements=True)
    if kind == "pgbouncer-transaction":
        # Told, not probed: assume PgBouncer < 1.21 unless the probe says otherwise.
        safe = await prepared_statements_safe(settings.dsn(), settings)
        return PoolerInfo("transaction", prepared_statements=safe)
    return await detect_pooler(settings)


def startup_parameters(settings: DatabaseSettings, pooler: PoolerInfo) -> dict[str, str]:
    """What a connection sends at startup: behind a pooler only its name, since PgBouncer
    refuses unknown startup parameters (the timeouts are then the role's; see the README)."""
    if pooler.mode == "none":
        return settings.server_settings()
    return {"application_name": settings.application_name}


def keeps_statements(pooler: PoolerInfo) -> bool:
    """Whether a named prepared statement survives from one transaction to the next."""
    return pooler.mode not in ("transaction", "statement") or pooler.prepared_statements
