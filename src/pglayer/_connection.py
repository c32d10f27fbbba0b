"""A pooled connection: queries with deadlines, pglayer errors, rows as Pydantic models."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Sequence,
)
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Literal, NoReturn, TypeGuard, TypeVar

import asyncpg
from pydantic import BaseModel

from pglayer import _context as context
from pglayer._clock import current_task
from pglayer._context import MAX_TIMEOUT, RequestContext
from pglayer._errors import (
    CommitIndeterminateError,
    ConnectionLostError,
    DatabaseError,
    DatabaseNotAnsweringError,
    DatabaseUnavailableError,
    LockTimeoutError,
    PglayerError,
    ProgrammingError,
    QueryTimeoutError,
    StatementsLostError,
    TransactionAbortedError,
    TransactionEndedError,
    raise_translated,
    translate,
)
from pglayer._logs import Throttle, left_out
from pglayer._observability import Observer

if TYPE_CHECKING:
    from pglayer._pool import Pool, Slot

__all__ = ["Connection", "Isolation"]

log = logging.getLogger("pglayer")

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")
Isolation = Literal["read_committed", "repeatable_read", "serializable"]
Record = asyncpg.Record


class _TimedOut(Exception):
    """A statement passed its deadline (raised in place of the clock's cancellation)."""


class _NotSent(_TimedOut):
    """The deadline passed before the statement was sent: it was not applied."""


_iterators_read: weakref.WeakSet[Any] = weakref.WeakSet()


def _read_once(rows: Iterable[Any] | AsyncIterable[Any], method: str) -> None:
    """Refuse an iterator (a generator) given again: by a retry of `db.run`, which would
    go on from where the earlier attempt stopped reading it. Re-iterable rows are fine."""
    if not isinstance(rows, Iterator | AsyncIterator):
        return
    with contextlib.suppress(TypeError):  # not weakly referable: cannot tell
        if rows in _iterators_read:
            raise ValueError(
                f"{method} was given an iterator that an earlier attempt has read (a retry of"
                " db.run): pass a list, or run it with retry=False"
            )
        _iterators_read.add(rows)


class Connection:
    """A pooled asyncpg connection whose errors are pglayer errors.

    `timeout` on every method is the client-side deadline in seconds; `None` uses the
    pool's `query_timeout`, and a request's deadline caps both. The driver connection is
    there as `raw` for what is not wrapped. It is valid until it goes back to the pool.
    """

    __slots__ = (
        "_ctx",
        "_depth",
        "_lock_bounded",
        "_pool",
        "_read_only",
        "_slot",
        "_writes",
        "lock_timeout_ms",
        "raw",
    )

    def __init__(
        self, slot: Slot, pool: Pool, ctx: RequestContext | None = None, *, writer: bool = False
    ) -> None:
        self._slot: Slot | None = slot
        self._pool = pool
        self._ctx = ctx
        self._depth = 0  # transactions open: 1 is BEGIN, more are savepoints
        # A primary connection lent for writing: every autocommit statement may write, so
        # each one marks the request for read-your-writes (transactions mark at COMMIT).
        self._writes = ctx.writes if writer and ctx is not None else None
        self.raw = slot.raw
        # Set by `Database.run` and `run_in_transaction` with `lock_timeout`: what is left of
        # the bound, for a statement that applies it itself (several lock waits in a row).
        self.lock_timeout_ms: int | None = None
        self._lock_bounded = False  # in a transaction whose lock waits are bounded
        # Lent for reads, or in a transaction pglayer began READ ONLY: a write refused here
        # (25006) is the caller's, not a server that has become read-only.
        self._read_only = not writer

    @property
    def observer(self) -> Observer:
        return self._pool.observer

    def is_closed(self) -> bool:
        """True when the connection is gone (closed, or already given back to the pool)."""
        return self._slot is None or self.raw.is_closed()

    def _translate(self, exc: Exception) -> BaseException:
        if isinstance(exc, _TimedOut):
            return QueryTimeoutError()
        closed = self.raw.is_closed()
        translated = translate(exc, connection_closed=closed)
        if closed and not isinstance(translated, PglayerError):
            # The driver's own failure on a connection that closed under it (asyncpg's
            # `AttributeError` writing to a transport it dropped): the connection was lost.
            translated = ConnectionLostError(sqlstate="08003")
        if (
            self._lock_bounded
            and isinstance(translated, QueryTimeoutError)
            and translated.sqlstate == "57014"
        ):
            # The bound's own statement_timeout (see `_begin`): stuck on locks past the bound.
            translated = LockTimeoutError(sqlstate=translated.sqlstate)
            translated.__cause__ = exc
        if getattr(translated, "sqlstate", None) == "25006" and not self._read_only:
            # A write refused on a connection lent for writes, outside a READ ONLY
            # transaction: the server is read-only (a primary demoted,
            # `default_transaction_read_only` set), which a session keeps from its start:
            # unavailable for writes, and not lent again.
            translated = DatabaseUnavailableError(
                "the database refuses writes: it is read-only for now", sqlstate="25006"
            )
            translated.__cause__ = exc
            self._pool.writes_refused()
        if isinstance(translated, ConnectionLostError) and not closed:
            # Broken but not yet closed: make sure the pool never hands it out again.
            getattr(self.raw, "terminate_broken", self.raw.terminate)()
        return translated

    def _raise(self, exc: Exception) -> NoReturn:
        translated = self._translate(exc)
        self._pool.observer.error(translated)
        raise_translated(exc, translated)

    def _arm(self, timeout: float | None, bounded: bool = True) -> tuple[Slot, float]:
        """Start a statement's deadline; the pool's clock cancels the task past it.

        `bounded`: by the request's deadline too (a ROLLBACK is not: it must reach the
        server, or the connection is lost with the work of its outer transaction)."""
        slot = self._slot
        if slot is None:
            raise RuntimeError("this connection was already given back to the pool")
        if slot.query_deadline:
            # Sent now, the driver would refuse it and leave the connection in a state the
            # next borrower trips on; its own error would not say why.
            error = ProgrammingError(
                "a statement is already running on this connection: one runs at a time"
                " (for statements side by side, `pglayer.gather` with `db.read`/`db.run`)"
            )
            self._pool.observer.error(error)
            raise error
        if timeout is not None:
            check_timeout(timeout)
        now = time.monotonic()
        due = now + (self._pool.query_timeout if timeout is None else timeout)
        ctx = self._ctx
        if bounded and ctx is not None and ctx.deadline is not None and ctx.deadline < due:
            due = ctx.deadline
        inner = context.current()  # `deadline()` may have narrowed it since the acquire
        if bounded and inner is not ctx and inner is not None and inner.deadline is not None:
            due = min(due, inner.deadline)
        if due <= now:
            raise _NotSent("the deadline passed before the statement was sent")
        slot.query_deadline = due
        slot.query_task = current_task()
        return slot, now

    @staticmethod
    def _timed_out(slot: Slot) -> bool:
        """After a CancelledError: True if it was the clock's, now taken back."""
        if not slot.timed_out:
            return False
        slot.timed_out = False
        task = current_task()
        # Cancelled for another reason too (shutdown, client gone): that one wins.
        return task is None or not task.uncancel()

    async def _call(
        self, method: Callable[..., Awaitable[T]], query: str, args: Any, timeout: float | None
    ) -> T:
        try:
            slot, started = self._arm(timeout)
        except _TimedOut as exc:
            self._raise(exc)
        try:
            try:
                result = await method(query, *args)
            except (
                asyncpg.InvalidSQLStatementNameError,
                asyncpg.DuplicatePreparedStatementError,
            ) as exc:
                # Only the driver's own statements (the app's EXECUTE or PREPARE are its own
                # business); an iterator of rows (executemany) may have been read: not resent.
                if '"__asyncpg_' not in str(exc):
                    raise
                if not self._statements_forgotten():
                    raise StatementsLostError(sqlstate=exc.sqlstate) from exc
                if any(isinstance(a, Iterator | AsyncIterator) for a in args):
                    raise
                result = await method(query, *args)  # it never ran: prepared again now
        except asyncio.CancelledError:
            slot.query_deadline = 0.0
            lost = slot.lost
            if not self._timed_out(slot):
                raise
            spent = time.monotonic() - started
            error = await self._deadline_error(lost, spent)
            self._finished(query, spent, error)
            raise error from TimeoutError("the statement passed its deadline")
        except Exception as exc:
            slot.query_deadline = 0.0
            if slot.timed_out:  # our cancellation, come out of the driver as another error
                self._timed_out(slot)
            translated = self._translate(exc)
            if getattr(exc, "server_source_function", None) is not None:
                self._pool.answered_at = time.monotonic()
            else:
                # Not the server's answer (which names its routine), though asyncpg may raise
                # the server's classes: the driver failed on its side, and may have left the
                # server mid-statement (an argument it could not encode leaves an extended
                # query without its Sync, which statement_timeout later ends, failing the
                # next holder): checked before the connection is lent again.
                slot.unsure = True
            if self._writes is not None and self._depth == 0 and outcome_unknown(translated):
                self._writes.wrote = True  # a statement in autocommit that may have applied
            self._finished(query, time.monotonic() - started, translated)
            raise_translated(exc, translated)
        slot.query_deadline = 0.0
        if self._writes is not None and self._depth == 0:
            self._writes.wrote = True
        self._pool.answered_at = now = time.monotonic()
        self._finished(query, now - started, None)
        return result

    def _statements_forgotten(self) -> bool:
        """After 26000 (a prepared statement the server does not know) or 42P05 (one it knows
        already): the session's were dropped under the driver's cache (`DISCARD ALL`,
        `DEALLOCATE ALL`), which would fail every statement it cached before on this
        connection, or a pooler hands out server connections per transaction after all
        (its mode changed, or `PGLAYER_POOLER` says otherwise). Forget them too, and behind
        a pooler stop naming them; True if the failed statement may simply run again
        (outside a transaction, which it aborted)."""
        raw: Any = self.raw
        raw._drop_local_statement_cache()  # private, as asyncpg's own codec changes call it
        if self._pool.behind_pooler:
            self._pool.statements_lost()
        return not raw.is_in_transaction()

    async def _deadline_error(self, lost: bool, spent: float) -> DatabaseError:
        """What a statement cancelled at its deadline failed with."""
        if lost:
            return ConnectionLostError(sqlstate="08006")
        silent = self._pool.silent(spent)
        if silent is None:
            silent = await self._pool.server_silent()
        return DatabaseNotAnsweringError() if silent else QueryTimeoutError()

    def _finished(self, query: str, seconds: float, error: BaseException | None) -> None:
        self._pool.observer.query_finished(query, seconds, error, self._ctx)

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str:
        """Run a statement and return its status tag (`INSERT 0 1`)."""
        return await self._call(self.raw.execute, query, args, timeout)

    async def executemany(
        self, query: str, args: Iterable[Sequence[Any]], *, timeout: float | None = None
    ) -> None:
        """Run a statement once for each argument tuple, in one round trip (an iterator of
        them is read once: see `copy_records`)."""
        _read_once(args, "executemany")
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
        rows = await self._call(self.raw.fetch, query, args, timeout)
        validate = model.model_validate
        return [validate(dict(row)) for row in rows]

    async def fetch_one(
        self, model: type[M], query: str, *args: Any, timeout: float | None = None
    ) -> M | None:
        """The first row validated into `model`, or `None`."""
        row = await self._call(self.raw.fetchrow, query, args, timeout)
        return None if row is None else model.model_validate(dict(row))

    async def copy_records(
        self,
        table: str,
        records: Iterable[Sequence[Any]] | AsyncIterable[Sequence[Any]],
        *,
        columns: Sequence[str],
        timeout: float | None = None,
    ) -> str:
        """Bulk-load `records` into `table` with COPY.

        An iterator (a generator) is read once: given again, by a retry of `db.run` after it
        was partly read, it is refused rather than loading what is left of it. A list, or
        any other re-iterable, may be given again."""
        _read_once(records, "copy_records")

        async def copy(_statement: str) -> str:
            return await self.raw.copy_records_to_table(
                table, records=records, columns=list(columns)
            )

        return await self._call(copy, f"COPY {table}", (), timeout)

    async def _control(
        self, statement: str, bounded: bool = True, timeout: float | None = None
    ) -> str:
        """BEGIN, COMMIT, ROLLBACK or a savepoint, under the same deadline as any statement.

        Sent as a simple query (so `BEGIN; SET LOCAL ...` is one round trip); raises driver
        errors as they are (the caller decides what they mean); past the deadline,
        `_TimedOut`.
        """
        slot, _ = self._arm(timeout, bounded)
        try:
            return await self.raw.execute(statement)
        except asyncio.CancelledError:
            if self._timed_out(slot):
                raise _TimedOut("no answer within the deadline") from None
            raise
        finally:
            slot.query_deadline = 0.0

    @asynccontextmanager
    async def transaction(
        self,
        *,
        readonly: bool = False,
        isolation: Isolation | None = None,
        deferrable: bool = False,
        lock_timeout: float | None = None,
    ) -> AsyncIterator[Connection]:
        """A transaction (a savepoint when nested) that commits when the block succeeds.

        Any exception in the block rolls back. A commit that fails raises (a deferred
        constraint, say); one whose connection is lost mid-flight raises
        `CommitIndeterminateError`, since it may or may not have been applied.
        `lock_timeout` (seconds) bounds each lock wait inside; past it, `LockTimeoutError`.
        """
        self._depth += 1
        savepoint = f"pglayer_{self._depth}" if self._depth > 1 else None
        bounded, read_only = self._lock_bounded, self._read_only
        if readonly:
            self._read_only = True
        if lock_timeout is not None:
            self._lock_bounded = True
        try:
            begin = _begin(readonly, isolation, deferrable, lock_timeout, savepoint)
            try:
                await self._control(begin)
            except Exception as exc:
                self._raise(exc)
            try:
                yield self
            except Exception as exc:
                if not isinstance(exc, TransactionEndedError) and self._ended_inside():
                    raise self._ended() from exc
                await self._rollback_quietly(savepoint)
                raise
            if self._ended_inside():
                raise self._ended()
            # On cancellation nothing is sent here: the pool rolls back before reuse.
            if savepoint is None:
                await self._commit(readonly)
            else:
                try:
                    await self._control(f"RELEASE SAVEPOINT {savepoint}")
                except _NotSent as exc:
                    # Past the deadline before RELEASE was sent: the savepoint's work is
                    # undone here, or the outer transaction would commit what failed.
                    await self._rollback_quietly(savepoint)
                    self._raise(exc)
                except Exception as exc:
                    self._raise(exc)
        finally:
            self._depth -= 1
            self._lock_bounded, self._read_only = bounded, read_only

    def _ended_inside(self) -> bool:
        # The server's transaction status from its last ReadyForQuery: no round trip.
        raw = self.raw
        return not raw.is_closed() and not raw.is_in_transaction()

    def _left_open(self) -> TransactionEndedError:
        """The error for a block lent a connection without a transaction that began one of
        its own (`BEGIN`) and left it open: the pool rolls it back, so nothing it did since
        was applied, and no success may be reported."""
        error = TransactionEndedError(
            "the block began a transaction (BEGIN) and left it open: what it did since its"
            " last BEGIN was rolled back (for a transaction, use db.transaction,"
            " db.run_in_transaction or WriteTransaction)"
        )
        self._pool.observer.error(error)
        return error

    def _ended(self) -> TransactionEndedError:
        """The error for a block that sent its own COMMIT or ROLLBACK: pglayer can neither
        commit nor undo what it did, so no success may be reported. The connection is not
        lent again: what the block set after it (a `SET`, outside any transaction) would
        stay with it."""
        getattr(self.raw, "terminate_broken", self.raw.terminate)()
        error = TransactionEndedError()
        self._pool.observer.error(error)
        return error

    def _indeterminate(self, what: str) -> CommitIndeterminateError:
        """The error for a connection that failed while `what` (a COMMIT, or a write in
        autocommit) was in flight: it may or may not have been applied."""
        count = _UNKNOWN_SAID.allow(what)
        if count is not None:
            log.exception(
                "%s outcome unknown: the connection failed while it was in flight; "
                "it may or may not have been applied%s",
                what,
                left_out(count),
            )
        error = CommitIndeterminateError()
        self._pool.observer.error(error)
        return error

    async def _commit(self, readonly: bool) -> None:
        if self.raw.is_closed():
            # Lost before COMMIT was written (asyncpg checks and writes without yielding):
            # nothing was applied, so the caller may replay the whole transaction.
            self._raise(ConnectionLostError(sqlstate="08003"))
        try:
            status = await self._control("COMMIT")
        except _NotSent as exc:
            # Past the deadline before COMMIT was sent: nothing applied. Rolled back here,
            # so the connection goes back clean.
            await self._rollback_quietly(None)
            self._raise(exc)
        except asyncpg.InternalClientError as exc:
            # The protocol refused to start COMMIT ("cannot switch to state"): not sent.
            self._raise(exc)
        except Exception as exc:
            translated = self._translate(exc)
            if outcome_unknown(translated):
                if not readonly:
                    # It may have committed: the client reads it back from the primary.
                    context.mark_wrote()
                raise self._indeterminate("COMMIT") from exc
            self._raise(exc)
        if status != "COMMIT":
            # PostgreSQL answers COMMIT of a failed transaction with ROLLBACK, not an error:
            # a statement failed inside and its error was swallowed. Nothing was applied.
            error = TransactionAbortedError()
            self._pool.observer.error(error)
            raise error
        if not readonly:
            context.mark_wrote()

    async def _rollback_quietly(self, savepoint: str | None) -> None:
        # The block's own exception is what the caller must see; a failed rollback only
        # means the connection is broken, and the pool discards broken connections.
        if self.is_closed():
            return
        statement = "ROLLBACK" if savepoint is None else f"ROLLBACK TO SAVEPOINT {savepoint}"
        try:
            # Not bound by the request's deadline, which may have passed (it must reach the
            # server), but by a short one of its own: a server that does not answer a
            # ROLLBACK at once loses the connection instead.
            await self._control(statement, bounded=False, timeout=_ROLLBACK_TIMEOUT)
        except Exception:
            if not self.raw.is_closed():
                getattr(self.raw, "terminate_broken", self.raw.terminate)()


_ISOLATION = {
    "read_committed": "READ COMMITTED",
    "repeatable_read": "REPEATABLE READ",
    "serializable": "SERIALIZABLE",
}


_ROLLBACK_TIMEOUT = 1.0  # seconds a ROLLBACK may take past the request's deadline
_UNKNOWN_SAID = Throttle()  # each request's own line (pglayer.http) has its request id


def outcome_unknown(error: BaseException) -> bool:
    """Whether a statement that failed with `error` may still have been applied: the
    connection was lost, or the client gave up waiting, while it was in flight."""
    if isinstance(error, ConnectionLostError):
        # The driver refused to start it ("cannot switch to state": the server ended the
        # connection while it sat idle in the pool): nothing was sent.
        if isinstance(error.__cause__, asyncpg.InternalClientError):
            return False
        return not _while_preparing(error.__cause__)
    if isinstance(error, QueryTimeoutError) and error.sqlstate is None:
        if isinstance(error.__cause__, _NotSent):
            return False
        cancelled = error.__context__  # where the deadline's cancellation found it
        return not (isinstance(cancelled, asyncio.CancelledError) and _while_preparing(cancelled))
    return False


_PREPARE = asyncpg.Connection._get_statement.__code__  # type: ignore[attr-defined]


def _while_preparing(error: BaseException | None) -> bool:
    """Whether `error` (or what caused it) arose while asyncpg was preparing the statement
    (Parse and Describe, and type introspection, before Bind and Execute): then it never
    ran. Without a statement cache, as behind a transaction pooler, preparing is a round trip
    of its own, where PgBouncer answers that it has no server connection to give."""
    while error is not None:
        tb = error.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code is _PREPARE:
                return True
            tb = tb.tb_next
        error = error.__cause__
    return False


# PostgreSQL takes lock_timeout in int milliseconds; past a day a bound bounds nothing.
MAX_LOCK_TIMEOUT = 86400.0


def _seconds(value: object) -> TypeGuard[float]:
    """Whether `value` is a number, not a bool or a string (a bound of it would fail in a
    request); NaN and infinity fail the range checks."""
    return type(value) in (int, float)


def check_timeout(timeout: float | None) -> None:
    """Raise `ValueError` for a deadline that would never fire (NaN) or is already past."""
    if timeout is not None and not (_seconds(timeout) and 0 < timeout <= MAX_TIMEOUT):
        raise ValueError(
            f"timeout must be seconds above 0, at most {MAX_TIMEOUT:g}, not {timeout!r}"
        )


def check_transaction_options(
    isolation: object, lock_timeout: object, attempts: object = None
) -> None:
    """Raise `ValueError` for an isolation level, a lock bound or a number of attempts no
    transaction can take (told where they are written, not in a request's conflict)."""
    if isolation is not None and isolation not in _ISOLATION:
        raise ValueError(f"isolation {isolation!r} is not one of: {', '.join(_ISOLATION)}")
    if attempts is not None and not (type(attempts) is int and attempts >= 1):
        raise ValueError(f"attempts must be a whole number, 1 or more, not {attempts!r}")
    if lock_timeout is not None and not (
        _seconds(lock_timeout) and 0 < lock_timeout <= MAX_LOCK_TIMEOUT
    ):
        raise ValueError(
            f"lock_timeout must be seconds above 0, at most {MAX_LOCK_TIMEOUT:g} (a day),"
            f" not {lock_timeout!r}"
        )


def _begin(
    readonly: bool,
    isolation: Isolation | None,
    deferrable: bool,
    lock_timeout: float | None,
    savepoint: str | None,
) -> str:
    """The statement(s) that open a transaction or a savepoint, as one simple query."""
    if savepoint is not None:
        if isolation is not None and isolation not in _ISOLATION:
            check_transaction_options(isolation, lock_timeout)  # a savepoint has none
        statement = f"SAVEPOINT {savepoint}"
    else:
        statement = "BEGIN"
        if isolation is not None:
            level = _ISOLATION.get(isolation)
            if level is None:
                check_transaction_options(isolation, lock_timeout)
            statement += f" ISOLATION LEVEL {level}"
        if readonly:
            statement += " READ ONLY"
        if deferrable:
            statement += " DEFERRABLE"
    if lock_timeout is not None:
        # Inline, not a call per transaction: `check_transaction_options` says what is wrong.
        if type(lock_timeout) not in (int, float) or not 0 < lock_timeout <= MAX_LOCK_TIMEOUT:
            check_transaction_options(isolation, lock_timeout)
        ms = max(int(lock_timeout * 1000), 1)
        # A statement can wait twice: for a row's tuple lock (queued behind other waiters),
        # then for the transaction that holds the row. Its own deadline keeps it in the
        # bound (and a little more, for the work after the wait).
        whole = ms + max(ms // 10, 20)
        statement += f"; SET LOCAL lock_timeout = {ms}; SET LOCAL statement_timeout = {whole}"
    return statement
