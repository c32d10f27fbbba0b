"""Optional SQLAlchemy support (`pip install 'pglayer[sqlalchemy]'`).

An `AsyncEngine` built from pglayer's settings (same timeouts, same startup parameters,
same pool bounds) and the translation of SQLAlchemy's errors into pglayer's. Pick it over
plain asyncpg when a team already models its domain with the ORM; plain asyncpg is leaner
and faster for hand-written SQL.
"""

from __future__ import annotations

import logging
import re
import uuid
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import sqlalchemy.exc
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, ExceptionContext, make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    AsyncSessionTransaction,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session
from sqlalchemy.util import await_only

from pglayer._context import mark_wrote, remaining
from pglayer._database import Database
from pglayer._errors import (
    CommitIndeterminateError,
    ConfigurationError,
    ConnectionLostError,
    PoolTimeoutError,
    StatementsLostError,
    TransactionAbortedError,
    raise_translated,
    translate,
    translate_connect,
)
from pglayer._observability import ExternalPoolStats
from pglayer._pooler import PoolerInfo, keeps_statements, resolve_pooler, startup_parameters
from pglayer._settings import DatabaseSettings

__all__ = ["count_engine", "create_engine", "session_transaction", "translate_sqlalchemy"]

log = logging.getLogger("pglayer")


def create_engine(
    settings: DatabaseSettings | None = None,
    *,
    database: Database | None = None,
    pool_size: int | None = None,
) -> AsyncEngine:
    """An asyncpg-backed engine with pglayer's deadlines and startup parameters.

    Its settings are `settings`, else `database`'s. Its pool is a second pool on the server:
    `pool_size` (default `settings.max_size`) connections per worker. Pass the app's
    `database` so they count in its connection budget and show in its `stats()`.
    Connections are pinged before use, so one lost while idle (a restart, a failover) is
    replaced instead of failing a request.
    """
    if settings is None:
        if database is None:
            raise ConfigurationError("create_engine() needs settings or a database")
        settings = database.settings
    size = settings.max_size if pool_size is None else pool_size
    url = make_url(settings.dsn()).set(drivername="postgresql+asyncpg")
    engine = create_async_engine(
        url,
        pool_size=size,
        max_overflow=0,
        pool_timeout=settings.acquire_timeout,
        pool_recycle=settings.max_inactive_connection_lifetime,
        pool_pre_ping=True,
        connect_args={
            "command_timeout": settings.query_timeout,
            "timeout": settings.connect_timeout,
        },
    )
    # Before `_watch`'s connect, which the first listener to return a connection makes.
    event.listen(engine.sync_engine, "do_connect", _fit_to_pooler(settings, database))
    _watch(engine.sync_engine)
    if database is not None:
        count_engine(database, engine)
    return engine


def _fit_to_pooler(settings: DatabaseSettings, database: Database | None) -> Any:
    """A `do_connect` listener: the startup parameters and statements that the pooler in
    front allows, as for pglayer's own pool (the pooler `database` found, else probed once).

    PgBouncer closes a connection that sends `statement_timeout` at startup; and in
    transaction mode before 1.21, SQLAlchemy's named statements meet another client's on a
    server connection (42P05) or are gone in the next transaction (26000): uniquely named
    and never cached, as SQLAlchemy's documentation asks for PgBouncer."""
    found: list[PoolerInfo] = []

    def fit(dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]) -> None:
        pooler = database.pooler if database is not None else None
        if pooler is None:
            if not found:
                try:
                    found.append(await_only(resolve_pooler(settings)))
                except Exception as exc:
                    raise_translated(exc, translate_connect(exc))
            pooler = found[0]
        cparams["server_settings"] = startup_parameters(settings, pooler)
        if not keeps_statements(pooler):
            cparams["statement_cache_size"] = 0
            cparams["prepared_statement_cache_size"] = 0
            cparams["prepared_statement_name_func"] = _statement_name

    return fit


def _statement_name() -> str:
    return f"__asyncpg_{uuid.uuid4().hex}__"


# Per database, the name each engine counted in it has (`sqlalchemy`, `sqlalchemy-2`, ...).
_counted: weakref.WeakKeyDictionary[Database, dict[int, str]] = weakref.WeakKeyDictionary()


def count_engine(database: Database, engine: AsyncEngine) -> None:
    """Count `engine`'s pool in `database`'s connection budget and `stats()` (once however
    often it is given; each engine under its own name: `sqlalchemy`, then `sqlalchemy-2`)."""
    pool: Any = engine.pool  # a QueuePool: size and counters, read without a lock
    size = int(pool.size()) + max(int(getattr(pool, "_max_overflow", 0)), 0)

    def stats() -> ExternalPoolStats:
        idle, in_use = pool.checkedin(), pool.checkedout()
        return ExternalPoolStats(max_size=size, size=idle + in_use, idle=idle, in_use=in_use)

    names = _counted.setdefault(database, {})
    name = names.setdefault(
        id(engine.sync_engine), f"sqlalchemy-{len(names) + 1}" if names else "sqlalchemy"
    )
    database.count_external_pool(name, size, stats)


_LOST = (asyncpg.InvalidSQLStatementNameError, asyncpg.DuplicatePreparedStatementError)


def translate_sqlalchemy(exc: BaseException) -> BaseException:
    """Map a SQLAlchemy error to a pglayer error by the driver error underneath it.

    The driver's own errors that SQLAlchemy does not wrap (a refused connect, a statement
    past the client-side timeout) are translated as they are raised, on engines built by
    `create_engine` or used through `session_transaction`."""
    if isinstance(exc, sqlalchemy.exc.TimeoutError):
        return PoolTimeoutError()
    if isinstance(exc, sqlalchemy.exc.DBAPIError):
        # SQLAlchemy raises its adapted error `from` asyncpg's exception.
        driver_error = exc.orig.__cause__ if exc.orig is not None else None
        if isinstance(driver_error, _LOST) and '"__asyncpg_' in str(driver_error):
            # The driver's own statements, gone with a pooler's server connection (an engine
            # not fitted to it, see `_fit_to_pooler`): not the app's bug.
            return StatementsLostError(sqlstate=driver_error.sqlstate)
        if driver_error is not None:
            translated = translate(driver_error, connection_closed=exc.connection_invalidated)
            if translated is not driver_error:
                return translated
        if exc.connection_invalidated:
            return ConnectionLostError()
    return exc


# Connections on which a statement failed since their transaction's last good state.
_failed: weakref.WeakSet[Connection] = weakref.WeakSet()


# Connections whose COMMIT was sent (until their next BEGIN): lost then, it may have applied.
_committing: weakref.WeakSet[Connection] = weakref.WeakSet()


def _on_error(context: ExceptionContext) -> BaseException | None:
    """Note the connection whose transaction failed; a connection lost during COMMIT is an
    unknown outcome; translate what SQLAlchemy leaves as the driver raised it (its
    client-side timeout: `TimeoutError`)."""
    connection, wrapped = context.connection, context.sqlalchemy_exception
    if connection is not None:
        _failed.add(connection)
    if not isinstance(context.original_exception, Exception):
        # Cancelled (its client left, the server stops): the caller's own cancellation goes
        # on as it is, as for pglayer's transactions; SQLAlchemy drops the connection.
        return None
    error = (
        translate_sqlalchemy(wrapped)
        if wrapped is not None
        else translate(context.original_exception)
    )
    if connection in _committing and (
        context.is_disconnect or isinstance(error, ConnectionLostError)
    ):
        log.error(
            "COMMIT outcome unknown (SQLAlchemy session): the connection failed while it was"
            " in flight; it may or may not have been applied"
        )
        return CommitIndeterminateError()
    if wrapped is None and error is not context.original_exception:
        return error
    return None


# The driver's own `command_timeout` of each connection (PGLAYER_QUERY_TIMEOUT from
# `create_engine`), for statements outside any deadline.
_own_timeouts: weakref.WeakKeyDictionary[Any, float | None] = weakref.WeakKeyDictionary()


# Connections whose transaction ran a statement other than a read: its COMMIT marks the
# request for read-your-writes (its client's next reads go to the primary).
_writing: weakref.WeakSet[Connection] = weakref.WeakSet()
_READ = re.compile(r"\s*(?:SELECT|SHOW)\b", re.IGNORECASE)


def _note_write(connection: Connection, cursor: object, statement: str, *_: object) -> None:
    if connection not in _writing and not _READ.match(statement):
        _writing.add(connection)


def _bound(connection: Connection, *_: object) -> None:
    """Bound the statement about to run by the request's deadline (or `pglayer.deadline()`),
    as pglayer's own statements are: through the driver's `command_timeout`, which asyncpg
    reads for every statement (no round trip; it cancels the statement on the server)."""
    driver: Any = connection.connection.driver_connection
    config = driver._config  # asyncpg's, private: its per-statement default timeout
    own = _own_timeouts.setdefault(driver, config.command_timeout)
    left = remaining()
    timeout = own if left is None else max(min(left, own or left), 0.001)
    if config.command_timeout != timeout:
        driver._config = config._replace(command_timeout=timeout)


def _note_commit(connection: Connection) -> None:
    _committing.add(connection)
    if connection in _writing:
        mark_wrote()  # before it is sent: a COMMIT whose outcome is unknown counts too


def _note_begin(connection: Connection) -> None:
    _committing.discard(connection)
    _writing.discard(connection)


def _connect(dialect: Any, record: Any, cargs: Any, cparams: Any) -> Any:
    """Connect as SQLAlchemy would; a failure is the database unavailable, as for pglayer's
    pool (SQLAlchemy raises the driver's errors at connect untranslated, past `handle_error`)."""
    try:
        return dialect.connect(*cargs, **cparams)
    except Exception as exc:
        # The dialect adapts the driver's errors: asyncpg's own (a refusal) is the cause.
        cause = exc.__cause__
        driver_error = cause if isinstance(cause, asyncpg.PostgresError) else exc
        translated = translate_connect(driver_error)
        raise_translated(exc, exc if translated is driver_error else translated)


def _note_recovery(connection: Connection, *_: object) -> None:
    _failed.discard(connection)  # a rolled-back savepoint: the transaction is good again


def _watch(engine: Engine) -> None:
    """Translate `engine`'s errors; note the connections whose transaction a failed
    statement aborted."""
    if not engine.__dict__.get("_pglayer_watched"):
        event.listen(engine, "handle_error", _on_error, retval=True)
        event.listen(engine, "rollback_savepoint", _note_recovery)
        event.listen(engine, "do_connect", _connect)
        event.listen(engine, "commit", _note_commit)
        event.listen(engine, "begin", _note_begin)
        event.listen(engine, "before_cursor_execute", _bound)
        event.listen(engine, "before_cursor_execute", _note_write)
        engine.__dict__["_pglayer_watched"] = True


# `session.info` key: set while the handler runs in `session_transaction`, whose block ends
# the transaction itself.
_HANDLED = "pglayer_in_handler"


@event.listens_for(Session, "before_commit")
def _refuse_handlers_commit(session: Session) -> None:
    if session.info.get(_HANDLED) and session.get_nested_transaction() is None:
        raise sqlalchemy.exc.InvalidRequestError(
            "session.commit() inside session_transaction (SqlSession): its block commits"
            " when it ends, before the response"
        )


def _check_not_ended(session: AsyncSession, begun: AsyncSessionTransaction) -> None:
    if session.sync_session.get_transaction() is not begun.sync_transaction:
        raise sqlalchemy.exc.InvalidRequestError(
            "the transaction of session_transaction (SqlSession) was ended in its block"
            " (session.rollback()): nothing after it would be committed"
        )


async def _check_not_aborted(session: AsyncSession) -> None:
    transaction = session.get_transaction()
    if transaction is not None and not transaction.is_active:
        # A flush failed and SQLAlchemy rolled back the transaction itself (the caller
        # caught the error): what was flushed before it is gone too.
        raise TransactionAbortedError()
    if _failed and session.in_transaction():
        connection = await session.connection()
        if connection.sync_connection in _failed:
            raise TransactionAbortedError()


@asynccontextmanager
async def session_transaction(
    sessions: async_sessionmaker[AsyncSession],
) -> AsyncIterator[AsyncSession]:
    """A session in a transaction: committed when the block succeeds, else rolled back.

    A block that caught a statement's error and went on ends in `TransactionAbortedError`:
    PostgreSQL answers the COMMIT of that transaction with ROLLBACK, not an error, and the
    driver does not look (a 2xx would stand for writes that were never applied)."""
    try:
        # Closed for good at the end: used again (background work, a stream), it would begin
        # anew, on a connection that nothing gives back.
        async with sessions(close_resets_only=False) as session:
            bind = session.get_bind()
            _watch(bind if isinstance(bind, Engine) else bind.engine)
            transaction = await session.begin()
            session.info[_HANDLED] = True
            try:
                yield session
            finally:
                del session.info[_HANDLED]
            _check_not_ended(session, transaction)
            await _check_not_aborted(session)
            await transaction.commit()  # on an error instead, closing the session rolls back
    except Exception as exc:
        raise_translated(exc, translate_sqlalchemy(exc))
