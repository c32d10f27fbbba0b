"""Dependencies that hand a handler a pooled connection or a transaction.

They use `scope="function"`: FastAPI runs their exit (commit, release) after the handler
returns and the response is built, but before a byte of it is sent. So a 2xx always means
committed, and a failed COMMIT becomes an error response.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import Depends, Request

from pglayer._connection import Connection, Isolation
from pglayer._database import Database
from pglayer._errors import ConfigurationError

__all__ = [
    "Db",
    "ReadConnection",
    "WriteConnection",
    "WriteTransaction",
    "get_database",
    "transaction_dependency",
]

STATE_KEY = "pglayer_database"


async def get_database(request: Request) -> Database:
    """The `Database` bound to this app by `setup()`."""
    # async: FastAPI runs a sync dependency in a thread, a hop that costs every request.
    db = getattr(request.app.state, STATE_KEY, None)
    if not isinstance(db, Database):
        raise ConfigurationError("no Database bound to this app: call pglayer.fastapi.setup()")
    return db


async def _connection(request: Request) -> AsyncIterator[Connection]:
    async with (await get_database(request)).connection() as conn:
        yield conn


async def _replica_connection(request: Request) -> AsyncIterator[Connection]:
    async with (await get_database(request)).read_connection() as conn:
        yield conn


def transaction_dependency(
    *,
    readonly: bool = False,
    isolation: Isolation | None = None,
    lock_timeout: float | None = None,
    bulkhead: str | None = None,
) -> Callable[[Request], AsyncIterator[Connection]]:
    """A dependency yielding a connection inside a transaction with these options.

    `lock_timeout` bounds each lock wait (503 `busy` past it); `bulkhead` names the
    connections it counts against (default `read` or `write`).
    """

    async def dependency(request: Request) -> AsyncIterator[Connection]:
        async with (await get_database(request)).transaction(
            readonly=readonly, isolation=isolation, lock_timeout=lock_timeout, bulkhead=bulkhead
        ) as conn:
            yield conn

    return dependency


def _depends(dependency: Callable[..., Any]) -> Any:
    return Depends(dependency, scope="function")


Db = Annotated[Database, Depends(get_database)]
"""The app's `Database`, for `db.run(...)` (retried reads) and `db.run_in_transaction(...)`."""

WriteConnection = Annotated[Connection, _depends(_connection)]
"""A primary connection in autocommit mode: each statement commits on its own (one round trip)."""

WriteTransaction = Annotated[Connection, _depends(transaction_dependency())]
"""A read-write transaction, committed before the response is sent."""

ReadConnection = Annotated[Connection, _depends(_replica_connection)]
"""A connection for reads: a healthy replica's, else the primary's (always after a write)."""
