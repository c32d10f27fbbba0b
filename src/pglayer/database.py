"""`Database`: the pool's lifecycle, deadlines on acquire, bounded waiting, and statistics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, Self, TypeVar

import asyncpg
import orjson
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_random_exponential,
)

from pglayer import context, deadline
from pglayer.budget import read_budget
from pglayer.connection import Connection, Isolation, Record
from pglayer.dsn import describe_target
from pglayer.errors import (
    ConfigurationError,
    DatabaseUnavailableError,
    PglayerError,
    PoolOverloadedError,
    PoolTimeoutError,
    TransientError,
    translate,
)
from pglayer.events import Hook
from pglayer.observer import Observer
from pglayer.pooler import PoolerInfo, detect_pooler, prepared_statements_safe
from pglayer.replicas import ReplicaSet
from pglayer.retry import RetryPolicy, retrying
from pglayer.settings import DatabaseSettings
from pglayer.stats import PoolStats, StatsRecorder

__all__ = ["Database"]

log = logging.getLogger("pglayer")
T = TypeVar("T")

_RELEASE_TIMEOUT = 5.0


async def _init_connection(conn: asyncpg.Connection[Record]) -> None:
    for pg_type in ("json", "jsonb"):
        await conn.set_type_codec(
            pg_type,
            encoder=lambda value: orjson.dumps(value).decode(),
            decoder=orjson.loads,
            schema="pg_catalog",
        )


async def _no_reset(conn: asyncpg.Connection[Record]) -> None:
    # asyncpg's default reset sends `RESET ALL; UNLISTEN *; ...` on every release: a round
    # trip per request. pglayer never changes session state (it uses SET LOCAL), and an open
    # transaction is still rolled back by asyncpg before this hook runs.
    return None


class _TrackedConnection(asyncpg.Connection):  # generic only in the stubs
    """Remembers that the client closed it, so a retirement is not counted as a loss.

    The pool retires idle connections with `terminate()`; a connection pglayer finds broken
    is ended with `terminate_broken()` and still counts as lost.
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
            raise ConfigurationError("no database URL configured: set DATABASE_URL")
        self.name = name
        self.target = describe_target(self.settings.dsn())
        self._pool: asyncpg.Pool[Record] | None = None
        self._opener: asyncio.Task[None] | None = None
        self._closing = False
        self._waiting = 0
        self._gate = asyncio.Semaphore(self.settings.max_size)
        self.pooler: PoolerInfo | None = None  # known once the pool has been created
        self.replicas: ReplicaSet | None = None
        if self.settings.replica_urls:
            self.replicas = ReplicaSet(
                [
                    Database(self.settings.for_replica(url), name=f"replica-{i}", hooks=hooks)
                    for i, url in enumerate(self.settings.replica_urls, start=1)
                ],
                max_lag=self.settings.replica_max_lag,
                interval=self.settings.replica_check_interval,
            )
        self._stats = StatsRecorder()
        self._observer = Observer(
            name,
            self._stats,
            slow_query_threshold=self.settings.slow_query_threshold,
            hooks=hooks,
        )
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
        self._closing = False
        if wait if wait is not None else self.settings.require_on_startup:
            try:
                await self._open_with_retry(self.settings.startup_timeout)
            except TransientError as exc:
                raise DatabaseUnavailableError(
                    f"database {self.target} not reachable within "
                    f"{self.settings.startup_timeout:g}s: {exc}"
                ) from exc
        else:
            try:
                self._pool = await self._create_pool()
            except TransientError as exc:
                log.warning(
                    "database %s not reachable (%s); retrying in the background", self.target, exc
                )
                self._opener = asyncio.create_task(self._open_in_background())
                return
        await self._check_budget()
        if self.replicas is not None:
            await self.replicas.open()

    async def _check_budget(self) -> None:
        s = self.settings
        if s.on_budget_exceeded == "ignore" or (self.pooler and self.pooler.mode != "none"):
            return  # behind a pooler the server's limit is the pooler's business
        pool = self._pool
        if pool is None:
            return
        try:
            # Straight from the pool: a startup check is not traffic to count in stats.
            async with pool.acquire(timeout=s.acquire_timeout) as conn:
                budget = await read_budget(
                    conn,
                    application_name=s.application_name,
                    workers=s.workers,
                    max_size=s.max_size,
                    reserve=s.connection_reserve,
                )
        except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as exc:
            log.warning(
                "database %s: connection budget not checked: %s", self.target, type(exc).__name__
            )
            return
        if budget.fits:
            return
        message = f"database {self.target}: connection budget exceeded: {budget.describe()}"
        if s.on_budget_exceeded == "refuse":
            await self.close()
            raise ConfigurationError(message)
        log.warning(message)

    async def _open_with_retry(self, deadline: float) -> None:
        async for attempt in AsyncRetrying(
            stop=stop_after_delay(deadline),
            wait=wait_random_exponential(multiplier=0.1, max=2.0),
            retry=retry_if_exception_type(TransientError),
            reraise=True,
        ):
            with attempt:
                self._pool = await self._create_pool()

    async def _open_in_background(self) -> None:
        try:
            await self._open_with_retry(float("inf"))
            log.info("database %s is reachable; pool open", self.target)
        finally:
            self._opener = None

    async def _resolve_pooler(self) -> PoolerInfo:
        kind = self.settings.pooler
        if kind == "none":
            return PoolerInfo("none", prepared_statements=True)
        if kind == "pgbouncer-session":
            return PoolerInfo("session", prepared_statements=True)
        if kind == "pgbouncer-transaction":
            # Told, not probed: assume PgBouncer < 1.21 unless the probe says otherwise.
            safe = await prepared_statements_safe(self.settings.dsn(), self.settings)
            return PoolerInfo("transaction", prepared_statements=safe)
        return await detect_pooler(self.settings)

    async def _create_pool(self) -> asyncpg.Pool[Record]:
        s = self.settings
        try:
            if self.pooler is None:
                self.pooler = await self._resolve_pooler()
                if self.pooler.mode != "none":
                    log.info(
                        "database %s: behind a pooler in %s mode; prepared statements %s",
                        self.target,
                        self.pooler.mode,
                        "kept" if self.pooler.prepared_statements else "off",
                    )
            pooled = self.pooler.mode in ("transaction", "statement")
            server_settings = s.server_settings()
            if self.pooler.mode != "none":
                # PgBouncer refuses unknown startup parameters: keep what it forwards and
                # set the timeouts on the role instead (see the README).
                server_settings = {"application_name": s.application_name}
            pool = await asyncpg.create_pool(
                s.dsn(),
                min_size=s.min_size,
                max_size=s.max_size,
                max_inactive_connection_lifetime=s.max_inactive_connection_lifetime,
                command_timeout=s.query_timeout,
                statement_cache_size=(
                    0 if pooled and not self.pooler.prepared_statements else s.statement_cache_size
                ),
                timeout=s.connect_timeout,
                server_settings=server_settings,
                init=_init_connection,
                reset=_no_reset,
                connect=self._connect,
                connection_class=_TrackedConnection,
            )
        except Exception as exc:
            translated = translate(exc)
            if translated is exc:
                raise
            raise translated from exc
        assert pool is not None
        return pool

    async def _connect(self, *args: Any, **kwargs: Any) -> asyncpg.Connection[Record]:
        try:
            conn: asyncpg.Connection[Record] = await asyncpg.connect(*args, **kwargs)
        except BaseException:
            self._observer.connection_failed()
            raise
        self._observer.connection_opened()
        conn.add_termination_listener(self._on_connection_closed)  # type: ignore[arg-type]
        return conn

    def _on_connection_closed(self, conn: asyncpg.Connection[Record]) -> None:
        if self._closing or getattr(conn, "closed_by_client", False):
            # Retired by the pool (idle lifetime, close()) or by pglayer: not a loss.
            self._observer.connection_closed()
        else:
            self._observer.connection_lost()

    async def close(self, timeout: float | None = None) -> None:
        """Close the pool: wait up to `timeout` for in-flight work, then terminate the rest."""
        self._closing = True
        if self.replicas is not None:
            await self.replicas.close(timeout)
        if self._opener is not None:
            self._opener.cancel()
            with contextlib.suppress(asyncio.CancelledError, TransientError):
                await self._opener
            self._opener = None
        pool, self._pool = self._pool, None
        if pool is None:
            return
        grace = self.settings.close_timeout if timeout is None else timeout
        try:
            await asyncio.wait_for(pool.close(), grace)
        except TimeoutError:
            log.warning(
                "database %s: connections still in use after %.1fs; terminating them",
                self.target,
                grace,
            )
            pool.terminate()

    # -- connections -----------------------------------------------------------------

    async def _acquire(self, timeout: float | None) -> tuple[asyncpg.Pool[Record], Any]:
        pool = self._pool
        if pool is None:
            raise self._refused(DatabaseUnavailableError())
        wait = self.settings.acquire_timeout if timeout is None else timeout
        left = deadline.remaining()
        if left is not None:
            if left <= 0:
                raise self._refused(
                    PoolTimeoutError("the request deadline passed before a connection was free")
                )
            wait = min(wait, left)
        started = time.perf_counter()
        gate = self._gate
        # The gate admits max_size holders in arrival order. asyncpg's own queue lets a
        # newcomer take a connection a woken waiter was about to get, which under load
        # starves some requests for hundreds of milliseconds.
        if gate.locked():
            if self._waiting >= self.settings.max_waiters:
                raise self._refused(PoolOverloadedError())
            self._waiting += 1
            try:
                async with asyncio.timeout(wait):
                    await gate.acquire()
            except TimeoutError as exc:
                raise self._refused(PoolTimeoutError()) from exc
            finally:
                self._waiting -= 1
        else:
            await gate.acquire()  # free: returns without suspending
        # Past the gate a connection is free; only a new one (pool below max_size) may need
        # connecting, bounded by what is left of the wait.
        full = pool.get_size() >= self.settings.max_size
        try:
            conn = await pool.acquire(
                timeout=None if full else max(wait - (time.perf_counter() - started), 0.001)
            )
        except BaseException as exc:
            gate.release()
            if isinstance(exc, TimeoutError):
                raise self._refused(PoolTimeoutError()) from exc
            if not isinstance(exc, Exception):
                raise
            translated = translate(exc)
            if isinstance(translated, PglayerError):
                self._observer.acquire_failed(translated)
            if translated is exc:
                raise
            raise translated from exc
        self._observer.acquired(time.perf_counter() - started)
        return pool, conn

    def saturated(self) -> bool:
        """True while an acquire would be shed: `max_waiters` are already waiting."""
        return self._gate.locked() and self._waiting >= self.settings.max_waiters

    def count_shed(self) -> None:
        """Count a request refused for `saturated()` before it asked for a connection."""
        self._observer.acquire_failed(PoolOverloadedError())

    def _refused(self, error: PglayerError) -> PglayerError:
        self._observer.acquire_failed(error)
        return error

    async def _release(self, pool: asyncpg.Pool[Record], conn: Any, held_since: float) -> None:
        # To the pool it came from: during close() that pool is still waiting for it.
        self._observer.released(time.perf_counter() - held_since)
        try:
            await pool.release(conn, timeout=_RELEASE_TIMEOUT)
        except Exception:
            # asyncpg has already terminated a connection it could not reset; the error
            # must not mask the block's own outcome.
            log.debug("connection reset failed on release; it was discarded", exc_info=True)
        finally:
            self._gate.release()

    @asynccontextmanager
    async def connection(self, *, timeout: float | None = None) -> AsyncIterator[Connection]:
        """A pooled connection in autocommit mode, acquired within `timeout` seconds."""
        pool, raw = await self._acquire(timeout)
        held_since = time.perf_counter()
        try:
            yield Connection(raw, self._observer)
        finally:
            await self._release(pool, raw, held_since)

    @asynccontextmanager
    async def transaction(
        self,
        *,
        readonly: bool = False,
        isolation: Isolation | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[Connection]:
        """A pooled connection inside a transaction that commits when the block succeeds."""
        async with (
            self.connection(timeout=timeout) as conn,
            conn.transaction(readonly=readonly, isolation=isolation),
        ):
            yield conn

    async def run(
        self,
        fn: Callable[[Connection], Awaitable[T]],
        *,
        retry: bool = True,
        timeout: float | None = None,
    ) -> T:
        """Call `fn(conn)` on a pooled connection in autocommit mode; return its result.

        With `retry`, transient failures (connection lost, no connection slots, database
        not yet open) are retried with jittered backoff within the attempts and the
        deadline, so `fn` must be safe to run twice: a read, or an idempotent write.
        """

        async def attempt() -> T:
            # connection() spelled out: this is every read's path, and a generator-based
            # context manager costs more than the rest of this function.
            pool, raw = await self._acquire(timeout)
            held_since = time.perf_counter()
            try:
                return await fn(Connection(raw, self._observer))
            finally:
                await self._release(pool, raw, held_since)

        if not retry:
            return await attempt()
        return await retrying(attempt, self.retry_policy, self._observer, "run")

    def _read_target(self) -> Database:
        if self.replicas is None or context.reads_need_primary():
            return self
        return self.replicas.choose() or self

    async def read(
        self, fn: Callable[[Connection], Awaitable[T]], *, timeout: float | None = None
    ) -> T:
        """Like `run(fn)`, on a healthy replica when there is one.

        Falls back to the primary when no replica is healthy, when this request (or its
        client, recently) wrote, or when the replica fails; `fn` must only read.
        """
        target = self._read_target()
        if target is self:
            return await self.run(fn, timeout=timeout)
        try:
            return await target.run(fn, retry=False, timeout=timeout)
        except TransientError:
            assert self.replicas is not None
            self.replicas.mark_failed(target)
            return await self.run(fn, timeout=timeout)

    @asynccontextmanager
    async def read_connection(self, *, timeout: float | None = None) -> AsyncIterator[Connection]:
        """A connection of a healthy replica (else of the primary), for reads only."""
        target = self._read_target()
        if target is not self:
            try:
                pool, raw = await target._acquire(timeout)
            except TransientError:
                assert self.replicas is not None
                self.replicas.mark_failed(target)
            else:
                held_since = time.perf_counter()
                try:
                    yield Connection(raw, target._observer)
                finally:
                    await target._release(pool, raw, held_since)
                return
        async with self.connection(timeout=timeout) as conn:
            yield conn

    def pools(self) -> list[Database]:
        """This pool and its replicas' pools."""
        return [self, *(self.replicas.replicas if self.replicas else [])]

    async def run_in_transaction(
        self,
        fn: Callable[[Connection], Awaitable[T]],
        *,
        readonly: bool = False,
        isolation: Isolation | None = None,
        retry: bool = True,
        timeout: float | None = None,
    ) -> T:
        """Call `fn(conn)` inside a transaction, commit, and return its result.

        With `retry`, the whole transaction is replayed on serialization failures,
        deadlocks and connections lost before COMMIT was sent; `fn` must therefore only
        touch the database through `conn`. A connection lost during COMMIT raises
        `CommitIndeterminateError` and is never replayed.
        """

        async def attempt() -> T:
            async with self.transaction(
                readonly=readonly, isolation=isolation, timeout=timeout
            ) as conn:
                return await fn(conn)

        if not retry:
            return await attempt()
        return await retrying(attempt, self.retry_policy, self._observer, "transaction")

    async def ping(self, *, timeout: float = 1.0) -> None:
        """Run `SELECT 1` within `timeout` seconds (acquire included); raise if it fails."""
        deadline = time.monotonic() + timeout
        async with self.connection(timeout=timeout) as conn:
            await conn.fetchval("SELECT 1", timeout=max(deadline - time.monotonic(), 0.001))

    # -- statistics ------------------------------------------------------------------

    def stats(self) -> PoolStats:
        """A consistent snapshot of the pool's sizes and counters."""
        pool = self._pool
        size = idle = 0
        if pool is not None:
            size, idle = pool.get_size(), pool.get_idle_size()
        return self._stats.snapshot(
            name=self.name,
            open=pool is not None,
            min_size=self.settings.min_size,
            max_size=self.settings.max_size,
            size=size,
            idle=idle,
            waiting=self._waiting,
        )
