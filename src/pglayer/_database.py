"""`Database`: one server's pool behind a small facade, with its replicas and retries.

The pool (`_pool.Pool`) lends connections; the replica set (`replicas.ReplicaSet`) picks
where a read goes; this facade opens and closes them, translates settings, and runs the
caller's work with the retry policy. Every way to run work (`run`, `read`,
`run_in_transaction`, `connection()`) goes through `_call` or `_Lease`: one acquire, one
release, one place that decides about retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, TypeVar

import asyncpg
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_before_delay,
    wait_random_exponential,
)
from tenacity.stop import stop_base

from pglayer._budget import read_budget
from pglayer._connection import (
    Connection,
    Isolation,
    Record,
    check_timeout,
    check_transaction_options,
    outcome_unknown,
)
from pglayer._context import RequestContext, current, reads_need_primary
from pglayer._dsn import describe_target
from pglayer._errors import (
    ConfigurationError,
    ConnectionLostError,
    DatabaseError,
    DatabaseUnavailableError,
    LockTimeoutError,
    PglayerError,
    PoolOverloadedError,
    PoolTimeoutError,
    QueryTimeoutError,
    SerializationError,
    TransientError,
    explain_connect_error,
    refusal,
    translate,
)
from pglayer._json import json_decode, json_encode, jsonb_decode, jsonb_encode
from pglayer._observability import (
    BulkheadStats,
    ExternalPoolStats,
    Hook,
    Observer,
    PoolStats,
    SlowQuery,
    StatsRecorder,
)
from pglayer._pool import Pool, Slot
from pglayer._pooler import (
    PoolerInfo,
    keeps_statements,
    resolve_pooler,
    server_timeouts,
    settings_off,
    startup_parameters,
)
from pglayer._replicas import ReplicaSet
from pglayer._retry import RetryPolicy, retry_after
from pglayer._settings import DatabaseSettings

__all__ = ["Database"]

# After work of a bulkhead waited past its lock bound, for this long (or the bound, if
# longer) and until a transaction of it commits, its lock-bounded work counts the wait for a
# connection into that bound.
_STUCK_FOR = 1.0
STILL_DOWN_EVERY = 60.0  # seconds between the warnings of a pool that keeps failing to open

log = logging.getLogger("pglayer")
T = TypeVar("T")

Work = Callable[[Connection], Awaitable[T]]


_NO_CONNECTION = (PoolTimeoutError, PoolOverloadedError)
# What fails a read on a replica that is working: its connections all busy, or a conflict
# with recovery (40001: a statement cancelled as the replay needed what it read).
_REPLICA_BUSY = (*_NO_CONNECTION, SerializationError)


def _busy(exc: Exception) -> LockTimeoutError:
    # On a lane stuck on a lock, a bounded call that got no connection in time waited on
    # that lock: its connections were held by waits on it.
    error = LockTimeoutError(
        "no connection within the lock bound: this bulkhead's connections wait on a lock"
    )
    error.__cause__ = exc
    return error


async def _write_alone(conn: Connection, fn: Work[T], bound: float | None) -> T:
    # One write statement in autocommit: it is its own COMMIT. Lost before it was sent, it
    # may be replayed; lost while in flight, its outcome is unknown.
    if conn.raw.is_closed():
        raise ConnectionLostError(sqlstate="08003")
    conn.lock_timeout_ms = None if bound is None else max(int(bound * 1000), 1)
    try:
        return await fn(conn)
    except Exception as exc:
        if outcome_unknown(exc):
            raise conn._indeterminate("Autocommit write") from exc
        raise


# A replica behind the primary's schema: undefined table, column, function, object, schema.
_NOT_REPLAYED_YET = frozenset({"42P01", "42703", "42883", "42704", "3F000"})


@dataclass(frozen=True, slots=True)
class _Tx:
    readonly: bool = False
    isolation: Isolation | None = None
    lock_timeout: float | None = None
    attempts: int | None = None  # replays allowed, the first included; None: the policy's
    lock_until: float = 0.0  # when the lock bound of the first attempt ends (replays share it)
    begin: bool = True  # False: autocommit, `fn`'s statement applies the lock bound itself


async def _init_connection(conn: asyncpg.Connection[Record]) -> None:
    # Binary, as COPY needs (a text codec made `copy_records` fail on every json column);
    # jsonb's binary form is a version byte, then the text.
    await conn.set_type_codec(
        "json", encoder=json_encode, decoder=json_decode, schema="pg_catalog", format="binary"
    )
    await conn.set_type_codec(
        "jsonb", encoder=jsonb_encode, decoder=jsonb_decode, schema="pg_catalog", format="binary"
    )


class _TrackedConnection(asyncpg.Connection):  # generic only in the stubs
    """Remembers that the client closed it, so a retirement is not counted as a loss.

    The pool retires idle connections with `close()` or `terminate()`; a connection pglayer
    finds broken is ended with `terminate_broken()` and still counts as lost.
    """

    closed_by_client = False

    async def close(self, *, timeout: float | None = None) -> None:
        self.closed_by_client = True
        await super().close(timeout=timeout)

    def terminate(self) -> None:
        self.closed_by_client = True
        super().terminate()

    def terminate_broken(self) -> None:
        super().terminate()


_STATE_SAID = {
    "new": "the database is not open: `await db.open()` (or `async with db`) first; in an"
    " app, `setup(app, db)` opens it with the app's lifespan",
    "failed": "the database is not open: its open() failed (see what it raised)",
    "closed": "the database was closed",
}


class _Closed(stop_base):
    """Stops `open()`'s retries once the database is closed meanwhile."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self.db._state == "closed"


_CLOSED_TO_CONNECTIONS = "55000"  # "database ... is not currently accepting connections"


class Database:
    """A pool of PostgreSQL connections.

    Use `open()` / `close(timeout)` or `async with Database(settings) as db:`.
    Every acquire has a deadline and a bound on how many may wait; queries have deadlines;
    errors are pglayer errors.
    """

    def __init__(
        self,
        settings: DatabaseSettings | None = None,
        *,
        name: str = "primary",
        hooks: Iterable[Hook] = (),
    ) -> None:
        hooks = list(hooks)  # shared with the replicas' pools
        self.settings = settings if settings is not None else DatabaseSettings()
        if self.settings.url is None:
            raise ConfigurationError(
                "no database URL configured: set DATABASE_URL (an app built at import, as"
                " `app = ...` in a module, needs it then: build it in a function and serve"
                " that with `--factory`, for tests too)"
            )
        self.name = name
        self.target = describe_target(self.settings.dsn())
        self._pool: Pool | None = None
        self._opener: asyncio.Task[None] | None = None
        # Why the pool is not open yet (the last connect refused while it opens in the
        # background): what a caller meanwhile is told, readiness's 53300 `refused` among it.
        self._not_open_yet: TransientError | None = None
        self._opening: asyncio.Future[None] | None = None  # while open() runs
        self._opening_task: asyncio.Task[Any] | None = None  # the task running it
        self._closed_while_opening = False  # by another task: open() then says so
        self._state = "new"  # then "opened" (or "failed"), "closed"
        self.pooler: PoolerInfo | None = None  # known once the pool has been created
        self.replicas: ReplicaSet | None = None
        # `reads_read_only`: reads in a READ ONLY transaction; None, in autocommit.
        self._read_tx = _Tx(readonly=True) if self.settings.reads_read_only else None
        self._replica_of: ReplicaSet | None = None  # a replica's: the set it reports health to
        if self.settings.replica_urls:
            self.replicas = ReplicaSet(
                [
                    Database(self.settings.for_replica(url), name=f"replica-{i}", hooks=hooks)
                    for i, url in enumerate(self.settings.replica_urls, start=1)
                ],
                max_lag=self.settings.replica_max_lag,
                interval=self.settings.replica_check_interval,
                primary=self,
                read_your_writes=self.settings.read_your_writes_window,
            )
            for replica in self.replicas.replicas:
                replica._replica_of = self.replicas
        self._stats = StatsRecorder()
        self._observer = Observer(
            name,
            self._stats,
            slow_query_threshold=self.settings.slow_query_threshold,
            hooks=hooks,
        )
        self._external: dict[str, tuple[int, Callable[[], ExternalPoolStats]]] = {}
        self.retry_policy = RetryPolicy(
            attempts=self.settings.retry_attempts,
            initial=self.settings.retry_initial_wait,
            maximum=self.settings.retry_max_wait,
        )

    # -- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def add_hook(self, hook: Hook) -> None:
        """Call `hook` with every event of this pool from now on (see `pglayer.events`)."""
        self._observer.hooks.append(hook)

    def count_external_pool(
        self, name: str, max_size: int, stats: Callable[[], ExternalPoolStats]
    ) -> None:
        """Count another pool of this app on this server (an ORM's) in the budget and stats.

        Its `max_size` connections per worker join this pool's in the connection budget
        (checked at `open()`), and `stats()` reports it under `external[name]`.
        """
        self._external[name] = (max_size, stats)

    @property
    def is_open(self) -> bool:
        """True once the pool exists (connections may still be failing)."""
        return self._pool is not None

    async def open(self, *, wait: bool | None = None) -> None:
        """Create the pool.

        With `wait` (default: `settings.require_on_startup`), keep retrying an unreachable
        server with jittered backoff for `startup_timeout` seconds, then raise
        `DatabaseUnavailableError` naming the target. Without it, return at once and keep
        connecting in the background; until then every acquire fails fast as transient.
        """
        if self._pool is not None or self._opener is not None:
            return
        if self._opening is not None:
            # Opened by another caller at this moment: one pool, which it may fail to make.
            await asyncio.shield(self._opening)
            return await self.open(wait=wait)
        self._opening = asyncio.get_running_loop().create_future()
        self._opening_task = asyncio.current_task()
        self._closed_while_opening = False
        self._state = "opened"
        try:
            await self._open(wait)
        except BaseException as exc:
            if self._closed_while_opening and isinstance(exc, Exception):
                raise DatabaseUnavailableError(
                    "the database was closed while it was opening"
                ) from exc
            if self._state != "closed":  # closed by its own budget check: said so
                self._state = "failed"
            raise
        finally:
            self._opening.set_result(None)
            self._opening = None
        if self._closed_while_opening:
            raise DatabaseUnavailableError("the database was closed while it was opening")

    async def _open(self, wait: bool | None) -> None:
        if wait if wait is not None else self.settings.require_on_startup:
            try:
                await self._open_with_retry(self.settings.startup_timeout)
            except TransientError as exc:
                # The reason names the target (`explain_connect_error`).
                said = self._not_open_yet
                why = f"{exc}" if said is None or said is exc else f"{exc}; before that: {said}"
                raise DatabaseUnavailableError(
                    f"database not reachable within {self.settings.startup_timeout:g}s: {why}"
                ) from exc
        else:
            try:
                self._pool = await self._create_pool()
            except TransientError as exc:
                self._not_open_yet = exc
                log.warning(
                    "database %s not reachable (%s); retrying in the background", self.target, exc
                )
                self._opener = asyncio.create_task(self._open_in_background())
                if self.replicas is not None:
                    await self.replicas.open()  # reads may be served while the primary is down
                return
        await self._check_budget()
        await self._check_pooled_timeouts()
        if self.replicas is not None:
            await self.replicas.open()

    async def _check_pooled_timeouts(self) -> None:
        """Warn when a pooler's server applies other timeouts than configured (pglayer sends
        only `application_name` at connect through one; `pglayer doctor` prints the fix)."""
        if self.pooler is None or self.pooler.mode == "none":
            return
        assert self._pool is not None
        try:
            async with self._pool.borrowed() as conn:
                server_ms = await server_timeouts(conn)
        except (PglayerError, asyncpg.PostgresError, OSError, asyncpg.InterfaceError):
            return
        # The bound a live server ends statements by (see `Pool.silent`) is its own here.
        self._pool.statement_timeout = server_ms.get("statement_timeout", 0) / 1000
        off = [said for said, _ in settings_off(self.settings, server_ms).values()]
        if off:
            log.warning(
                "database %s: behind a %s pooler the server's own settings apply, not the"
                " configured ones: %s; set them on the role (`pglayer doctor` prints how)",
                self.target,
                self.pooler.mode,
                ", ".join(off),
            )

    async def _check_budget(self) -> None:
        s = self.settings
        if s.on_budget_exceeded == "ignore" or (self.pooler and self.pooler.mode != "none"):
            return  # behind a pooler the server's limit is the pooler's business
        assert self._pool is not None
        workers, source = s.worker_count()
        log.info(
            "database %s: connection budget assumes %d worker(s) (%s)", self.target, workers, source
        )
        try:
            async with self._pool.borrowed() as conn:
                budget = await read_budget(
                    conn,
                    application_name=s.application_name,
                    workers=workers,
                    max_size=s.max_size + sum(size for size, _ in self._external.values()),
                    reserve=s.connection_reserve,
                )
        except (PglayerError, asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as exc:
            log.warning(
                "database %s: connection budget not checked: %s", self.target, type(exc).__name__
            )
            return
        if budget.fits:
            return
        message = budget.exceeded(
            self.target, f"max_size {s.max_size}{self._external_sizes()}", source
        )
        if s.on_budget_exceeded == "refuse":
            await self.close()
            raise ConfigurationError(message)
        log.warning(message)

    def _external_sizes(self) -> str:
        return "".join(f" + {name} {size}" for name, (size, _) in self._external.items())

    async def _open_with_retry(self, deadline: float, said_at: float | None = None) -> None:
        """Open the pool, retrying transient failures for `deadline` seconds; `said_at`: when
        the failure was last logged, for one retrying without end (see `_say_still_down`)."""
        ends = time.monotonic() + deadline
        async for attempt in AsyncRetrying(
            stop=stop_before_delay(deadline) | _Closed(self),  # no sleep that ends past it
            wait=wait_random_exponential(multiplier=0.1, max=2.0),
            retry=retry_if_exception_type(TransientError),
            before_sleep=self._say_retrying(deadline)
            if said_at is None
            else self._say_still_down(said_at),
            reraise=True,
        ):
            with attempt:
                try:
                    self._pool = await self._create_pool(ends)
                except TransientError as exc:
                    # A refusal said stays the reason while what follows is only a wait (a
                    # pooler holds its clients after a failed login: `Pool._refusal_stands`).
                    if refusal(exc) is not None or refusal(self._not_open_yet) is None:
                        self._not_open_yet = exc
                    raise
                self._not_open_yet = None

    def _say_retrying(self, deadline: float) -> Callable[[RetryCallState], None]:
        """Log the first failed attempt, so a wait for a server that is down is not silent."""

        def say(state: RetryCallState) -> None:
            if state.attempt_number == 1 and state.outcome is not None:
                log.warning(
                    "database not reachable (%s); retrying for up to %gs",
                    state.outcome.exception(),
                    deadline,
                )

        return say

    def _say_still_down(self, said_at: float) -> Callable[[RetryCallState], None]:
        """Log, once every `STILL_DOWN_EVERY` seconds, a pool that keeps failing to open in
        the background: said once at startup, the outage was silent after while every
        request was answered 503."""
        since = said_at

        def say(state: RetryCallState) -> None:
            nonlocal since
            now = time.monotonic()
            if now - since >= STILL_DOWN_EVERY and state.outcome is not None:
                since = now
                log.warning(
                    "database %s still not reachable after %ds (%s); retrying in the"
                    " background, its requests are answered 503",
                    self.target,
                    now - said_at,
                    state.outcome.exception(),
                )

        return say

    async def _open_in_background(self) -> None:
        try:
            await self._open_with_retry(float("inf"), said_at=time.monotonic())
            log.info("database %s is reachable; pool open", self.target)
        finally:
            self._opener = None
        try:
            await self._check_budget()
            await self._check_pooled_timeouts()
        except ConfigurationError:
            log.exception("database %s: pool closed", self.target)  # budget refused
            return
        if self.replicas is not None:
            await self.replicas.open()

    async def _create_pool(self, ends: float = math.inf) -> Pool:
        """The pool; the pooler in front, if not known yet, probed before `ends`
        (`time.monotonic()`: the startup deadline)."""
        s = self.settings
        if self.pooler is None:
            try:
                # Behind a pooler whose server has just gone, its probes wait in the pooler's
                # queue: each is bounded, and together they end with the startup deadline.
                left = ends - time.monotonic()
                async with asyncio.timeout(None if math.isinf(left) else left):
                    self.pooler = await resolve_pooler(self.settings)
            except Exception as exc:
                # Counted as the pool's own connects are: an app started while its server is
                # down retries here, and the alerts on failed connects must see it.
                self._observer.connection_failed()
                raise self._startup_error(exc) from exc
            if self.pooler.mode == "statement":
                self.pooler = None  # probed again by the next open()
                raise ConfigurationError(
                    f"database {self.target}: behind a pooler in statement mode, where"
                    " transactions cannot work; set its pool_mode to transaction or session"
                )
            if self.pooler.mode != "none":
                log.info(
                    "database %s: behind a pooler in %s mode; prepared statements %s",
                    self.target,
                    self.pooler.mode,
                    "kept" if self.pooler.prepared_statements else "off",
                )
        pool = Pool(
            self._connector(self.pooler),
            name=self.name,
            min_size=s.min_size,
            max_size=s.max_size,
            max_waiters=s.max_waiters,
            acquire_timeout=s.acquire_timeout,
            query_timeout=s.query_timeout,
            statement_timeout=s.statement_timeout,
            max_idle=s.max_inactive_connection_lifetime,
            connect_timeout=s.connect_timeout,
            observer=self._observer,
            bulkheads=s.bulkhead_caps(),
            refusal_delay=s.refusal_delay,
            target=self.target,
            behind_pooler=self.pooler.mode != "none",
        )
        try:
            await pool.start()
        except Exception as exc:
            raise self._startup_error(exc) from exc
        return pool

    def _startup_error(self, exc: Exception) -> BaseException:
        """A failed first connection, said in words; transient failures stay retryable."""
        cause = exc.__cause__ if isinstance(exc, PglayerError) and exc.__cause__ else exc
        translated = translate(cause)
        reason = explain_connect_error(cause, self.target)
        if isinstance(cause, TimeoutError):  # no answer in time: down or overloaded, for now
            return DatabaseUnavailableError(reason)
        if getattr(translated, "sqlstate", None) == _CLOSED_TO_CONNECTIONS:
            # `ALLOW_CONNECTIONS false`, a maintenance window: it ends, as an outage does.
            return DatabaseUnavailableError(reason, sqlstate=_CLOSED_TO_CONNECTIONS)
        if isinstance(translated, TransientError):
            return type(translated)(reason, sqlstate=translated.sqlstate)
        if isinstance(translated, DatabaseError):
            return ConfigurationError(reason)  # it names the target
        return translated

    def _connector(self, pooler: PoolerInfo) -> Callable[[], Awaitable[asyncpg.Connection]]:
        s = self.settings
        server_settings = startup_parameters(s, pooler)
        cache = s.statement_cache_size if keeps_statements(pooler) else 0

        async def connect() -> asyncpg.Connection:
            conn: asyncpg.Connection = await asyncpg.connect(
                s.dsn(),
                timeout=s.connect_timeout,
                # Deadlines are pglayer's (see _clock): no driver timer per statement.
                command_timeout=None,
                statement_cache_size=cache,
                server_settings=server_settings,
                connection_class=_TrackedConnection,
            )
            try:
                await _init_connection(conn)
            except BaseException:
                conn.terminate()
                raise
            return conn

        return connect

    async def close(self, timeout: float | None = None) -> None:
        """Close the pool: wait up to `timeout` for in-flight work, then terminate the rest
        (the replicas' pools at the same time)."""
        if self._state == "opened":
            self._state = "closed"
        if self._opening is not None and self._opening_task is not asyncio.current_task():
            # open() under way elsewhere: it stops trying now, and what it opened is closed
            # here. (open() itself closes what it opened when the budget check refuses.)
            self._closed_while_opening = True
            await asyncio.shield(self._opening)
        if self.replicas is None:
            await self._close_primary(timeout)
        else:
            await asyncio.gather(self.replicas.close(timeout), self._close_primary(timeout))

    async def _close_primary(self, timeout: float | None) -> None:
        if self._opener is not None:
            self._opener.cancel()
            with contextlib.suppress(asyncio.CancelledError, TransientError):
                await self._opener
            self._opener = None
        pool, self._pool = self._pool, None
        if pool is None:
            return
        await pool.close(self.settings.close_timeout if timeout is None else timeout)

    # -- running work ----------------------------------------------------------------

    def connect_refused(self) -> str | None:
        """The SQLSTATE with which the server refuses the primary's pool connections now (a
        connection limit, 53300: the pool cannot open or grow), else None."""
        return self._pool.refused_by if self._pool is not None else refusal(self._not_open_yet)

    def _unavailable(self) -> DatabaseUnavailableError:
        if self._opening is None and self._opener is None and self._state != "opened":
            # A programming slip more often than an outage: say what to do.
            error = DatabaseUnavailableError(_STATE_SAID[self._state])
            error.lasting = True
        else:
            why = self._not_open_yet
            error = DatabaseUnavailableError(sqlstate=why.sqlstate if why is not None else None)
        self._observer.acquire_failed(error)
        return error

    async def _call(
        self,
        target: Database,
        fn: Work[T],
        retry: bool,
        timeout: float | None,
        tx: _Tx | None,
        bulkhead: str,
    ) -> T:
        # Every read and write in one coroutine: acquire, run, release; retries and the
        # replica fallback only on the `except` path.
        if timeout is not None:
            check_timeout(timeout)
        ctx = current()
        pool = target._pool
        if pool is None:
            error: Exception = target._unavailable()
            return await self._recover(error, target, fn, retry, timeout, tx, bulkhead)
        lane = pool.lanes_by_name.get(bulkhead) or pool.lane(bulkhead)
        bound = None if tx is None else tx.lock_timeout
        asked = 0.0  # set while the lock bound also covers the wait for a connection
        if tx is not None and bound is not None and lane.locked_at:
            now = time.monotonic()
            if now - lane.locked_at < max(bound, _STUCK_FOR):
                # Work of this lane waited past its lock bound lately, and none has
                # committed since: its connections are likely held by waits on that lock,
                # and waiting in line for one is waiting on it too, so the bound covers it
                # (and the replays).
                asked = now
                if tx.lock_until:
                    bound = max(tx.lock_until - now, 0.001)
                else:
                    tx = dataclasses.replace(tx, lock_until=now + bound)
                timeout = bound if timeout is None else min(timeout, bound)
        try:
            slot = pool.take(lane)
            if slot is None:
                waited = time.monotonic()
                slot = await pool.acquire(
                    lane, timeout, None if ctx is None else ctx.deadline, bound or 0.0
                )
                if bound is not None and not asked and lane.locked_at > waited:
                    asked = waited  # the lane got stuck while it waited: on that lock too
        except Exception as exc:
            if bound is not None and lane.locked_at and isinstance(exc, _NO_CONNECTION):
                exc = _busy(exc)
            return await self._recover(exc, target, fn, retry, timeout, tx, bulkhead)
        conn = Connection(slot, pool, ctx, writer=target is self and bulkhead != "read")
        held_since = time.monotonic()
        suspect = True  # until it ends well: see `Pool.release`
        failed = False
        try:
            if tx is None:
                result = await fn(conn)
                suspect = False
                return result  # unless `finally` finds a transaction `fn` left open
            if asked and bound is not None:
                bound = max(bound - (held_since - asked), 0.001)
            if not tx.begin:
                result = await _write_alone(conn, fn, bound)
            else:
                if bound is not None:
                    conn.lock_timeout_ms = max(int(bound * 1000), 1)
                async with conn.transaction(
                    readonly=tx.readonly, isolation=tx.isolation, lock_timeout=bound
                ):
                    result = await fn(conn)
        except Exception as exc:
            error, failed = exc, True
            suspect = isinstance(exc, QueryTimeoutError)
            if isinstance(exc, LockTimeoutError):
                pool.stuck(lane)
        else:
            suspect = False
            if lane.locked_at:
                pool.progressed(lane)
            return result
        finally:
            conn._slot = None
            left_open = pool.release(slot, time.monotonic() - held_since, suspect)
            if left_open and not failed:
                raise conn._left_open()  # instead of its success: nothing was applied
        return await self._recover(error, target, fn, retry, timeout, tx, bulkhead)

    async def _recover(
        self,
        error: Exception,
        target: Database,
        fn: Work[T],
        retry: bool,
        timeout: float | None,
        tx: _Tx | None,
        bulkhead: str,
    ) -> T:
        if target is not self:
            # A replica that has not replayed a migration yet (a table or column it does not
            # know), or whose connections are all busy: the primary answers, and it stays in
            # rotation. One that failed leaves the rotation, and another replica answers.
            if self.replicas is None:
                raise error
            if isinstance(error, _REPLICA_BUSY) or (
                getattr(error, "sqlstate", None) in _NOT_REPLAYED_YET
            ):
                return await self._call(self, fn, True, timeout, tx, bulkhead)
            if not isinstance(error, TransientError):
                raise error
            self.replicas.mark_failed(target)
            # The primary may be down too; each replica that fails leaves the rotation, so
            # this ends, at the primary at worst.
            other = self.replicas.choose()
            return await self._call(other or self, fn, True, timeout, tx, bulkhead)
        if not retry:
            raise error
        policy = self.retry_policy
        if tx is not None and tx.attempts is not None:
            policy = dataclasses.replace(policy, attempts=tx.attempts)
        return await retry_after(
            error,
            lambda: self._call(self, fn, False, timeout, tx, bulkhead),
            policy,
            self._observer,
            "transaction" if tx is not None and tx.begin else "run",
        )

    def run(
        self,
        fn: Work[T],
        *,
        retry: bool = True,
        timeout: float | None = None,
        bulkhead: str = "write",
        lock_timeout: float | None = None,
    ) -> Coroutine[Any, Any, T]:
        """Call `fn(conn)` on a pooled connection in autocommit mode; return its result.

        With `retry`, transient failures (connection lost, no connection slots, database
        not yet open) are retried with jittered backoff within the attempts and the
        deadline, so `fn` must be safe to run twice: a read, or an idempotent write.
        `bulkhead` names the connections it counts against (see `DatabaseSettings`).

        `lock_timeout` makes `fn` one write statement, whose locks PostgreSQL releases as
        soon as it ends instead of a round trip later at COMMIT. Autocommit has no
        transaction for `SET LOCAL`, so the statement applies the bound itself:
        `conn.lock_timeout_ms` is what is left of it, for `set_config('lock_timeout', …,
        true)` first in a SQL function. Otherwise it is treated as a bounded transaction
        (see `run_in_transaction`): replayed only if it failed before it was sent or was
        rolled back, `CommitIndeterminateError` if the connection was lost while it ran,
        and on a lane stuck on a lock the whole call ends within the bound.
        """
        if lock_timeout is None:
            return self._call(self, fn, retry, timeout, None, bulkhead)
        check_transaction_options(None, lock_timeout)
        tx = _Tx(lock_timeout=lock_timeout, begin=False)
        return self._call(self, fn, retry, timeout, tx, bulkhead)

    def read(
        self, fn: Work[T], *, timeout: float | None = None, bulkhead: str = "read"
    ) -> Coroutine[Any, Any, T]:
        """Like `run(fn)`, on a healthy replica when there is one.

        Falls back to the primary when no replica is healthy, when this request (or its
        client, recently) wrote, or when the replica fails; `fn` must only read.
        """
        return self._call(self._read_target(), fn, True, timeout, self._read_tx, bulkhead)

    def run_in_transaction(
        self,
        fn: Work[T],
        *,
        readonly: bool = False,
        isolation: Isolation | None = None,
        lock_timeout: float | None = None,
        retry: bool = True,
        attempts: int | None = None,
        timeout: float | None = None,
        bulkhead: str | None = None,
    ) -> Coroutine[Any, Any, T]:
        """Call `fn(conn)` inside a transaction, commit, and return its result.

        With `retry`, the whole transaction is replayed on serialization failures,
        deadlocks and connections lost before COMMIT was sent; `fn` must therefore only
        touch the database through `conn`. A connection lost during COMMIT raises
        `CommitIndeterminateError` and is never replayed. `lock_timeout` bounds every lock
        wait inside (`SET LOCAL`, sent with BEGIN): past it, `LockTimeoutError`; PostgreSQL
        bounds each wait, so a statement that waits twice in a row (a row others queue on)
        can bound them together with `conn.lock_timeout_ms`, the bound in ms. Within a
        second (or the bound) of work of the same bulkhead hitting its bound, with no commit
        since, it also bounds the wait for a connection and the replays: the whole call
        then ends within it (`PoolTimeoutError` or `PoolOverloadedError` if no connection
        came in time).
        `attempts` overrides `retry_attempts` (the request's deadline bounds both).
        """
        check_transaction_options(isolation, lock_timeout, attempts)
        tx = _Tx(readonly, isolation, lock_timeout, attempts)
        lane = bulkhead or ("read" if readonly else "write")
        return self._call(self, fn, retry, timeout, tx, lane)

    def _read_target(self) -> Database:
        if self.replicas is None or reads_need_primary():
            return self
        return self.replicas.choose() or self

    def connection(self, *, timeout: float | None = None, bulkhead: str = "write") -> _Lease:
        """A pooled connection in autocommit mode, acquired within `timeout` seconds."""
        return _Lease(self, timeout, bulkhead, writer=True)

    @asynccontextmanager
    async def transaction(
        self,
        *,
        readonly: bool = False,
        isolation: Isolation | None = None,
        lock_timeout: float | None = None,
        timeout: float | None = None,
        bulkhead: str | None = None,
    ) -> AsyncIterator[Connection]:
        """A pooled connection inside a transaction that commits when the block succeeds."""
        lane = bulkhead or ("read" if readonly else "write")
        async with (
            self.connection(timeout=timeout, bulkhead=lane) as conn,
            conn.transaction(readonly=readonly, isolation=isolation, lock_timeout=lock_timeout),
        ):
            yield conn

    @asynccontextmanager
    async def read_connection(
        self, *, timeout: float | None = None, bulkhead: str = "read"
    ) -> AsyncIterator[Connection]:
        """A connection of a healthy replica (else of the primary), for reads only."""
        target = self._read_target()
        if target is not self:
            assert self.replicas is not None
            lease = _Lease(target, timeout, bulkhead, writer=False)
            try:
                conn = await lease.__aenter__()
            except _NO_CONNECTION:
                pass  # busy, not broken: it stays in rotation, the primary answers
            except TransientError:
                self.replicas.mark_failed(target)
            else:
                try:
                    yield conn
                except DatabaseError as exc:
                    if exc.sqlstate not in _NOT_REPLAYED_YET or not self.replicas.behind(target):
                        raise  # a replica in step with the primary: a bug, not a lag
                    # The handler ran on it (it cannot be replayed here, as `read` is): it
                    # leaves the rotation until its next check, and the client retries.
                    self.replicas.mark_failed(target, behind=True)
                    raise TransientError(
                        "the replica has not yet replayed a table or column this read needs",
                        sqlstate=exc.sqlstate,
                    ) from exc
                finally:
                    await lease.__aexit__(None, None, None)
                return
        async with _Lease(self, timeout, bulkhead, writer=False) as conn:
            if self._read_tx is None:
                yield conn
            else:
                async with conn.transaction(readonly=True):
                    yield conn

    def pools(self) -> list[Database]:
        """This pool and its replicas' pools."""
        return [self, *(self.replicas.replicas if self.replicas else [])]

    # For the replica set: not the application's to call.

    def _answered(self) -> None:
        """The server answered a check: connections are tried at once again."""
        if self._pool is not None:
            self._pool.answered()

    def _abandon(self) -> None:
        """The server stopped answering: fail what waits for a connection and close every
        connection, in use too, so that work on them fails now rather than at its deadline."""
        if self._pool is not None:
            self._pool.abandon()

    async def ping(self, *, timeout: float = 1.0) -> None:
        """Run `SELECT 1` within `timeout` seconds (acquire included); raise if it fails."""
        deadline = time.monotonic() + timeout
        # Not a writer: a readiness probe must not send its client to the primary (cookie).
        async with _Lease(self, timeout, "read", writer=False) as conn:
            await conn.fetchval("SELECT 1", timeout=max(deadline - time.monotonic(), 0.001))

    # -- load ------------------------------------------------------------------------

    def saturated(self, coming: int = 0) -> float | None:
        """While even a read would be refused at once, its predicted wait (seconds);
        `coming`: requests let in ahead of it that have not asked for a connection yet.
        Not while a healthy replica would take the read (the primary's trouble is not its)."""
        pool = self._pool
        predicted = None if pool is None else pool.saturated(coming)
        if predicted is None or self.replicas is None:
            return predicted
        if any(r.saturated(coming) is None for r in self.replicas.healthy()):
            return None
        return predicted

    def forecasting(self) -> bool:
        """Whether reads are admitted by their predicted wait now (see `saturated`)."""
        pool = self._pool
        return pool is not None and pool.forecasting()

    def count_shed(self) -> None:
        """Count a request refused for `saturated()` before it asked for a connection: a
        refusal of the `read` bulkhead too, whose forecast decided it."""
        self._observer.shed()
        pool = self._pool
        if pool is not None:
            pool.lanes_by_name["read"].refused += 1

    async def pause_refusal(self, predicted: float = 0.0, deadline: float | None = None) -> None:
        """Pause before answering a refusal: `refusal_delay`, longer for a long `predicted`
        wait, never past `deadline` (see `DatabaseSettings.refusal_delay`)."""
        paused = self.pace_refusal(predicted, deadline)
        if paused is not None:
            await paused

    def pace_refusal(
        self, predicted: float = 0.0, deadline: float | None = None
    ) -> asyncio.Future[None] | None:
        """The pause of `pause_refusal` as a future (None: answer at once)."""
        pool = self._pool
        return None if pool is None else pool.pace(predicted, deadline)

    # -- statistics ------------------------------------------------------------------

    def stats(self) -> PoolStats:
        """A consistent snapshot of the pool's sizes and counters."""
        pool = self._pool
        health = None if self._replica_of is None else self._replica_of.health.get(self.name)
        return self._stats.snapshot(
            name=self.name,
            open=pool is not None,
            min_size=self.settings.min_size,
            max_size=self.settings.max_size,
            size=0 if pool is None else pool.size,
            idle=0 if pool is None else pool.idle,
            in_use=0 if pool is None else pool.in_use,
            waiting=0 if pool is None else pool.waiting,
            bulkheads={}
            if pool is None
            else {
                lane.name: BulkheadStats(
                    cap=lane.cap,
                    in_use=lane.in_use,
                    waiting=lane.waiting,
                    refused=lane.refused,
                    acquire_timeouts=lane.timeouts,
                    hold_seconds=round(lane.hold, 6),
                )
                for lane in pool.lanes()
            },
            external={name: stats() for name, (_, stats) in self._external.items()},
            replica_healthy=None if health is None else health.healthy,
            replica_lag_seconds=None if health is None else health.lag_seconds,
        )

    def recent_slow_queries(self) -> list[SlowQuery]:
        """This pool's latest statements slower than `slow_query_threshold`, newest first.

        At most `RECENT_SLOW_QUERIES` (20); SQL text only, clipped, never parameters.
        """
        return list(reversed(self._stats.recent_slow))


class _Lease:
    """`async with db.connection() as conn`: one connection, given back on exit."""

    __slots__ = (
        "_bulkhead",
        "_conn",
        "_db",
        "_held_since",
        "_pool",
        "_slot",
        "_timeout",
        "_writer",
    )

    def __init__(self, db: Database, timeout: float | None, bulkhead: str, writer: bool) -> None:
        if timeout is not None:
            check_timeout(timeout)
        self._db = db
        self._timeout = timeout
        self._bulkhead = bulkhead
        self._writer = writer
        self._pool: Pool | None = None
        self._slot: Slot | None = None
        self._conn: Connection | None = None
        self._held_since = 0.0

    async def __aenter__(self) -> Connection:
        pool = self._db._pool
        if pool is None:
            raise self._db._unavailable()
        ctx: RequestContext | None = current()
        lane = pool.lane(self._bulkhead)
        slot = pool.take(lane) or await pool.acquire(
            lane, self._timeout, None if ctx is None else ctx.deadline
        )
        self._pool, self._slot = pool, slot
        self._conn = Connection(slot, pool, ctx, writer=self._writer)
        self._held_since = time.monotonic()
        return self._conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        pool, slot, conn = self._pool, self._slot, self._conn
        assert pool is not None
        assert slot is not None
        assert conn is not None
        conn._slot = None
        self._slot = None
        suspect = exc_type is not None and (
            not issubclass(exc_type, Exception) or issubclass(exc_type, QueryTimeoutError)
        )
        # To the pool it came from: during close() that pool is still waiting for it.
        left_open = pool.release(slot, time.monotonic() - self._held_since, suspect)
        if left_open and exc_type is None:
            raise conn._left_open()
