"""`Observer`: where a pool's events go: its counters, the slow-query log, and user hooks."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from pglayer._context import RequestContext
from pglayer._errors import PglayerError, PoolOverloadedError, PoolTimeoutError
from pglayer._events import Event, Hook, PoolEvent, PoolEventKind, QueryEvent, RetryEvent
from pglayer._stats import MAX_RECENT_STATEMENT, SlowQuery, StatsRecorder

__all__ = ["Observer"]

log = logging.getLogger("pglayer")
slow_log = logging.getLogger("pglayer.slow_query")

_MAX_LOGGED_STATEMENT = 2000


def _one_line(statement: str) -> str:
    text = " ".join(statement.split())
    if len(text) > _MAX_LOGGED_STATEMENT:
        text = text[:_MAX_LOGGED_STATEMENT] + "…"
    return text


class Observer:
    """Records one pool's events; hooks are only called (and events built) if there are any."""

    __slots__ = ("hooks", "pool", "slow_query_threshold", "stats")

    def __init__(
        self,
        pool: str,
        stats: StatsRecorder,
        *,
        slow_query_threshold: float = 0.0,
        hooks: Iterable[Hook] = (),
    ) -> None:
        self.pool = pool
        self.stats = stats
        self.slow_query_threshold = slow_query_threshold
        self.hooks: list[Hook] = list(hooks)

    def emit(self, event: Event) -> None:
        for hook in self.hooks:
            try:
                hook(event)
            except Exception:
                log.exception("instrumentation hook %r failed; ignored", hook)

    def _pool_event(self, kind: PoolEventKind, seconds: float | None = None) -> None:
        if self.hooks:
            self.emit(PoolEvent(self.pool, kind, seconds))

    # -- pool ------------------------------------------------------------------------

    def acquired(self, waited: float) -> None:
        self.stats.acquired(waited)
        self._pool_event("acquired", waited)

    def released(self, held: float) -> None:
        self.stats.released(held)
        self._pool_event("released", held)

    def acquire_failed(self, error: PglayerError) -> None:
        self.stats.error(type(error).__name__)
        if isinstance(error, PoolOverloadedError):
            self.stats.shed()
            self._pool_event("shed")
        elif isinstance(error, PoolTimeoutError):
            self.stats.acquire_timed_out()
            self._pool_event("acquire_timeout")

    def connection_opened(self) -> None:
        self.stats.connection_opened()
        self._pool_event("connection_opened")

    def connection_closed(self) -> None:
        self.stats.connection_closed()
        self._pool_event("connection_closed")

    def connection_lost(self) -> None:
        self.stats.connection_lost()
        self._pool_event("connection_lost")

    def connection_failed(self) -> None:
        self.stats.connection_failed()
        self._pool_event("connection_failed")

    # -- retries (the `RetryHooks` protocol) ------------------------------------------

    def retried(self, reason: str) -> None:
        self.stats.retried(reason)
        if self.hooks:
            self.emit(RetryEvent(self.pool, reason))

    def gave_up(self, reason: str) -> None:
        self.stats.gave_up(reason)
        if self.hooks:
            self.emit(RetryEvent(self.pool, reason, gave_up=True))

    # -- queries ---------------------------------------------------------------------

    def error(self, error: BaseException) -> None:
        self.stats.error(type(error).__name__)

    def query_finished(
        self,
        statement: str,
        seconds: float,
        error: BaseException | None = None,
        ctx: RequestContext | None = None,
    ) -> None:
        """Count a statement's duration under its context's operation; log it if slow."""
        operation = "-" if ctx is None else ctx.operation_name()
        self.stats.query(operation, seconds)
        if error is not None:
            self.stats.error(type(error).__name__)
        threshold = self.slow_query_threshold
        if threshold and seconds >= threshold:
            text = _one_line(statement)
            self.stats.slow_query(
                SlowQuery(
                    pool=self.pool,
                    statement=text
                    if len(text) <= MAX_RECENT_STATEMENT
                    else text[:MAX_RECENT_STATEMENT] + "…",
                    operation=operation,
                    seconds=round(seconds, 6),
                    request_id="-" if ctx is None else ctx.request_id,
                    at=time.time(),
                    error=None if error is None else type(error).__name__,
                )
            )
            slow_log.warning(
                "slow query: %.3fs in %s: %s",
                seconds,
                operation,
                text,
                extra={
                    "duration_seconds": round(seconds, 6),
                    "operation": operation,
                    "statement": text,
                    "pool": self.pool,
                },
            )
        if self.hooks:
            self.emit(
                QueryEvent(
                    pool=self.pool,
                    statement=statement,
                    seconds=seconds,
                    operation=operation,
                    request_id="-" if ctx is None else ctx.request_id,
                    error=None if error is None else type(error).__name__,
                    sqlstate=getattr(error, "sqlstate", None),
                )
            )
