"""Independent queries run at once on separate pooled connections, with structured cancellation.

Use it when the queries are independent and each is slow enough that running them side by
side beats their sum; for a few fast lookups one SQL statement (one round trip, one
connection) is usually faster. Either way, measure.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

from pglayer._connection import Connection
from pglayer._database import Database

__all__ = ["gather"]

T = TypeVar("T")
T1 = TypeVar("T1")
T2 = TypeVar("T2")
T3 = TypeVar("T3")
T4 = TypeVar("T4")
T5 = TypeVar("T5")
T6 = TypeVar("T6")
Query = Callable[[Connection], Awaitable[Any]]


# As typeshed types asyncio.gather: one overload per arity keeps each result's type.
@overload
async def gather(
    db: Database,
    q1: Callable[[Connection], Awaitable[T1]],
    /,
    *,
    max_connections: int = ...,
    read: bool = ...,
) -> tuple[T1]: ...
@overload
async def gather(
    db: Database,
    q1: Callable[[Connection], Awaitable[T1]],
    q2: Callable[[Connection], Awaitable[T2]],
    /,
    *,
    max_connections: int = ...,
    read: bool = ...,
) -> tuple[T1, T2]: ...
@overload
async def gather(
    db: Database,
    q1: Callable[[Connection], Awaitable[T1]],
    q2: Callable[[Connection], Awaitable[T2]],
    q3: Callable[[Connection], Awaitable[T3]],
    /,
    *,
    max_connections: int = ...,
    read: bool = ...,
) -> tuple[T1, T2, T3]: ...
@overload
async def gather(
    db: Database,
    q1: Callable[[Connection], Awaitable[T1]],
    q2: Callable[[Connection], Awaitable[T2]],
    q3: Callable[[Connection], Awaitable[T3]],
    q4: Callable[[Connection], Awaitable[T4]],
    /,
    *,
    max_connections: int = ...,
    read: bool = ...,
) -> tuple[T1, T2, T3, T4]: ...
@overload
async def gather(
    db: Database,
    q1: Callable[[Connection], Awaitable[T1]],
    q2: Callable[[Connection], Awaitable[T2]],
    q3: Callable[[Connection], Awaitable[T3]],
    q4: Callable[[Connection], Awaitable[T4]],
    q5: Callable[[Connection], Awaitable[T5]],
    /,
    *,
    max_connections: int = ...,
    read: bool = ...,
) -> tuple[T1, T2, T3, T4, T5]: ...
@overload
async def gather(
    db: Database,
    q1: Callable[[Connection], Awaitable[T1]],
    q2: Callable[[Connection], Awaitable[T2]],
    q3: Callable[[Connection], Awaitable[T3]],
    q4: Callable[[Connection], Awaitable[T4]],
    q5: Callable[[Connection], Awaitable[T5]],
    q6: Callable[[Connection], Awaitable[T6]],
    /,
    *,
    max_connections: int = ...,
    read: bool = ...,
) -> tuple[T1, T2, T3, T4, T5, T6]: ...
@overload
async def gather(
    db: Database,
    *queries: Callable[[Connection], Awaitable[T]],
    max_connections: int = ...,
    read: bool = ...,
) -> tuple[T, ...]: ...
async def gather(
    db: Database, *queries: Query, max_connections: int = 3, read: bool = False
) -> tuple[Any, ...]:
    """Run each `query(conn)` via `db.run` (retried reads) at once; return results in order.

    At most `max_connections` of them hold a connection at once, so one request cannot drain
    the pool. If any fails, the others are cancelled — their queries are cancelled on the
    server and their connections released — and that first error is raised as it is.
    `read=True` runs each via `db.read` instead (a healthy replica, else the primary), for
    queries that only read.
    """
    if type(max_connections) is not int or max_connections < 1:  # NaN bounded nothing
        raise ValueError(
            f"max_connections must be a whole number, 1 or more, not {max_connections!r}"
        )
    slots = asyncio.Semaphore(max_connections)

    run = db.read if read else db.run

    async def one(query: Query) -> Any:
        async with slots:
            return await run(query)

    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(one(q)) for q in queries]
    except BaseExceptionGroup as failed:
        # The first real error is what callers (and the problem handlers) understand.
        errors = [e for e in failed.exceptions if not isinstance(e, asyncio.CancelledError)]
        raise (errors or list(failed.exceptions))[0] from None
    return tuple(t.result() for t in tasks)
