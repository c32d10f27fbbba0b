"""Dependencies that hand a handler a pooled connection or a transaction.

They use `scope="function"`: FastAPI runs their exit (commit, release) after the handler
returns and the response is built, but before a byte of it is sent. So a 2xx always means
committed, and a failed COMMIT becomes an error response.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends
from starlette.requests import HTTPConnection

from pglayer._connection import Connection, Isolation, check_transaction_options
from pglayer._database import Database
from pglayer._errors import ConfigurationError

__all__ = [
    "Db",
    "ReadConnection",
    "WriteConnection",
    "WriteTransaction",
    "bound_database",
    "dependency_name",
    "get_database",
    "transaction_dependency",
]

STATE_KEY = "pglayer_database"


async def get_database(request: HTTPConnection) -> Database:
    """The `Database` bound to this app by `setup()` (HTTP and WebSocket routes alike)."""
    # async: FastAPI runs a sync dependency in a thread, a hop that costs every request.
    db = getattr(request.app.state, STATE_KEY, None)
    if not isinstance(db, Database):
        raise ConfigurationError("no Database bound to this app: call pglayer.fastapi.setup()")
    return db


async def bound_database(request: HTTPConnection) -> Database:
    """`get_database`, or what the app's `dependency_overrides` put in its place.

    pglayer's own dependencies and `Route` call this rather than asking FastAPI to solve
    `get_database` (a sub-dependency costs every request): an override is honoured
    wherever the database is reached."""
    overrides = getattr(request.app, "dependency_overrides", None)
    if overrides:
        override = overrides.get(get_database)
        if override is not None:
            return await _call_override(override, request)
    return await get_database(request)


async def _call_override(override: Callable[..., Any], request: HTTPConnection) -> Database:
    # Overrides as tests write them: `lambda: db`, or a function of the request.
    takes = len(inspect.signature(override).parameters)
    if takes > 1 or inspect.isasyncgenfunction(override) or inspect.isgeneratorfunction(override):
        raise ConfigurationError(
            "an override of get_database must be a function of no argument or of the request,"
            " returning the Database"
        )
    db = override(request) if takes else override()
    if inspect.isawaitable(db):
        db = await db
    if not isinstance(db, Database):
        raise ConfigurationError(f"the override of get_database returned {type(db).__name__}")
    return db


Opens = Callable[[Database], AbstractAsyncContextManager[Connection]]


def _opening(opens: Opens) -> Callable[[HTTPConnection], AsyncIterator[Connection]]:
    """A dependency yielding the connection `opens` gives for the app's database; `opens`
    kept on it, for `Route`, which opens it itself rather than have FastAPI solve it."""

    async def dependency(request: HTTPConnection) -> AsyncIterator[Connection]:
        async with opens(await bound_database(request)) as conn:
            yield conn

    dependency.pglayer_opens = opens  # type: ignore[attr-defined]
    return dependency


_connection = _opening(lambda db: db.connection())
_replica_connection = _opening(lambda db: db.read_connection())


def transaction_dependency(
    *,
    readonly: bool = False,
    isolation: Isolation | None = None,
    lock_timeout: float | None = None,
    bulkhead: str | None = None,
) -> Callable[[HTTPConnection], AsyncIterator[Connection]]:
    """A dependency yielding a connection inside a transaction with these options.

    Use it with `Depends(..., scope="function")`, as `WriteTransaction` does, so that it
    commits before the response is sent: FastAPI's default scope would commit after (a 2xx
    for a change that may still fail), and `setup()`'s lifespan refuses to start an app
    that uses it so. `lock_timeout` bounds each lock wait (503 `busy` past it); `bulkhead`
    names the connections it counts against (default `read` or `write`).
    """
    check_transaction_options(isolation, lock_timeout)
    dependency = _opening(
        lambda db: db.transaction(
            readonly=readonly, isolation=isolation, lock_timeout=lock_timeout, bulkhead=bulkhead
        )
    )
    dependency.pglayer_commits = True  # type: ignore[attr-defined]
    return dependency


@dataclass(frozen=True)
class Taken:
    """A connection dependency a `Route` opens itself, as the lifespan's checks see it."""

    call: Callable[..., Any]
    name: str
    scope: str = "function"
    dependencies: tuple[Any, ...] = ()


def transactions(dependant: Any) -> Iterator[Any]:
    """The transaction dependencies under `dependant` (FastAPI's sub-dependants, and those
    a `Route` takes from FastAPI to open itself)."""
    taken = getattr(dependant.call, "pglayer_taken", ()) if dependant.call else ()
    for sub in (*dependant.dependencies, *taken):
        if getattr(sub.call, "pglayer_commits", False):
            yield sub
        yield from transactions(sub)


def dependency_name(sub: Any) -> str:
    """A transaction dependency's parameter name (`dependencies=[...]`: unnamed)."""
    return str(sub.name or "transaction_dependency()")


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
