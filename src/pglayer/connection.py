"""A pooled connection: queries with deadlines, pglayer errors, rows as Pydantic models."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Literal, NoReturn, TypeVar

import asyncpg
from pydantic import BaseModel

from pglayer import context, deadline
from pglayer.errors import (
    CommitIndeterminateError,
    ConnectionLostError,
    QueryTimeoutError,
    translate,
)
from pglayer.observer import Observer

__all__ = ["Connection", "Isolation"]

log = logging.getLogger("pglayer")

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")
Isolation = Literal["read_committed", "repeatable_read", "serializable"]
Record = asyncpg.Record


def _bounded(timeout: float | None) -> float | None:
    """The explicit timeout, else what is left of the current deadline, else the default."""
    if timeout is not None:
        return timeout
    left = deadline.remaining()
    return None if left is None else max(left, 0.001)


class Connection:
    """A pooled asyncpg connection whose errors are pglayer errors.

    `timeout` on every method is the client-side deadline in seconds; `None` uses the
    pool's `query_timeout`. The driver connection is there as `raw` for what is not wrapped.
    """

    __slots__ = ("observer", "raw")

    def __init__(self, raw: asyncpg.Connection[Record], observer: Observer | None = None) -> None:
        self.raw = raw
        self.observer = observer

    def is_closed(self) -> bool:
        """True when the connection is gone (closed, or already taken back by the pool)."""
        try:
            return self.raw.is_closed()
        except asyncpg.InterfaceError:
            # asyncpg detaches the pool proxy of a connection that died under it.
            return True

    def _translate(self, exc: Exception) -> BaseException:
        translated = translate(exc, connection_closed=self.is_closed())
        if isinstance(translated, ConnectionLostError) and not self.is_closed():
            # Broken but not yet closed: make sure the pool never hands it out again.
            getattr(self.raw, "terminate_broken", self.raw.terminate)()
        return translated

    def _raise(self, exc: Exception) -> NoReturn:
        translated = self._translate(exc)
        if self.observer is not None:
            self.observer.error(translated)
        if translated is exc:
            raise exc
        raise translated from exc

    async def _call(
        self, method: Callable[..., Awaitable[T]], query: str, args: Any, timeout: float | None
    ) -> T:
        observer = self.observer
        started = time.perf_counter()
        try:
            result = await method(query, *args, timeout=_bounded(timeout))
        except Exception as exc:
            translated = self._translate(exc)
            if observer is not None:
                observer.query_finished(query, time.perf_counter() - started, translated)
            if translated is exc:
                raise
            raise translated from exc
        if observer is not None:
            observer.query_finished(query, time.perf_counter() - started)
        return result

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str:
        """Run a statement and return its status tag (`INSERT 0 1`)."""
        return await self._call(self.raw.execute, query, args, timeout)

    async def executemany(
        self, query: str, args: Iterable[Sequence[Any]], *, timeout: float | None = None
    ) -> None:
        """Run a statement once for each argument tuple, in one round trip."""
        await self._call(self.raw.executemany, query, (args,), timeout)

    async def fetch(self, query: str, *args: Any, timeout: float | None = None) -> list[Record]:
        """All rows as records."""
        return await self._call(self.raw.fetch, query, args, timeout)

    async def fetchrow(self, query: str, *args: Any, timeout: float | None = None) -> Record | None:
        """The first row, or `None`."""
        return await self._call(self.raw.fetchrow, query, args, timeout)

    async def fetchval(self, query: str, *args: Any, timeout: float | None = None) -> Any:
        """The first column of the first row, or `None`."""
        return await self._call(self.raw.fetchval, query, args, timeout)

    async def fetch_all(
        self, model: type[M], query: str, *args: Any, timeout: float | None = None
    ) -> list[M]:
        """All rows, each validated into `model` by column name."""
        rows = await self.fetch(query, *args, timeout=_bounded(timeout))
        validate = model.model_validate
        return [validate(dict(row)) for row in rows]

    async def fetch_one(
        self, model: type[M], query: str, *args: Any, timeout: float | None = None
    ) -> M | None:
        """The first row validated into `model`, or `None`."""
        row = await self.fetchrow(query, *args, timeout=_bounded(timeout))
        return None if row is None else model.model_validate(dict(row))

    async def copy_records(
        self,
        table: str,
        records: Iterable[Sequence[Any]],
        *,
        columns: Sequence[str],
        timeout: float | None = None,
    ) -> str:
        """Bulk-load `records` into `table` with COPY."""

        async def copy(_statement: str, *, timeout: float | None) -> str:
            return await self.raw.copy_records_to_table(
                table, records=records, columns=list(columns), timeout=timeout
            )

        return await self._call(copy, f"COPY {table}", (), timeout)

    @asynccontextmanager
    async def transaction(
        self,
        *,
        readonly: bool = False,
        isolation: Isolation | None = None,
        deferrable: bool = False,
    ) -> AsyncIterator[Connection]:
        """A transaction (a savepoint when nested) that commits when the block succeeds.

        Any exception in the block rolls back. A commit that fails raises (a deferred
        constraint, say); one whose connection is lost mid-flight raises
        `CommitIndeterminateError`, since it may or may not have been applied.
        """
        tx = self.raw.transaction(isolation=isolation, readonly=readonly, deferrable=deferrable)
        try:
            await tx.start()
        except Exception as exc:
            self._raise(exc)
        try:
            yield self
        except Exception:
            await self._rollback_quietly(tx)
            raise
        # On cancellation nothing is sent here: the pool's reset on release rolls back.
        try:
            await tx.commit()
            if not readonly:
                context.mark_wrote()
        except Exception as exc:
            translated = translate(exc, connection_closed=self.is_closed())
            if isinstance(translated, ConnectionLostError) or (
                isinstance(translated, QueryTimeoutError) and translated.sqlstate is None
            ):
                log.exception(
                    "COMMIT outcome unknown: the connection failed while COMMIT was in flight; "
                    "the transaction may or may not have been applied"
                )
                if self.observer is not None:
                    self.observer.error(CommitIndeterminateError())
                raise CommitIndeterminateError() from exc
            self._raise(exc)

    async def _rollback_quietly(self, tx: Any) -> None:
        # The block's own exception is what the caller must see; a failed rollback only
        # means the connection is broken, and the pool discards broken connections.
        if self.is_closed():
            return
        try:
            await tx.rollback()
        except Exception:
            if not self.is_closed():
                self.raw.terminate()
