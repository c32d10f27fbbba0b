"""Observability in one place: what a pool records, how it is read, and who is told.

- Statistics (`PoolStats`, `RequestStats`, one `Histogram` with fixed buckets): counters
  and histograms cheap enough for every acquire and request, read as frozen snapshots.
- Events and hooks (`PoolEvent`, `QueryEvent`, `RetryEvent`, `Hook`): for OpenTelemetry, logs
  or anything else. A hook is any callable taking one event. Register it with
  `Database(hooks=[...])` or `db.add_hook(...)`. Hooks run inline on the event loop, so they
  must be quick and must not block; one that raises is logged and otherwise ignored::

      def to_otel(event: pglayer.Event) -> None:
          if isinstance(event, pglayer.QueryEvent):
              histogram.record(event.seconds, {"db.operation": event.operation})

- `Observer`: the one object a pool reports to; it updates the statistics, writes the slow
  query log and calls the hooks.

The Prometheus exposition of all this is a plugin, imported only when asked for
(`pglayer._metrics`, mounted by `pglayer.fastapi.setup_metrics`).
"""

from __future__ import annotations

import bisect
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from pglayer._clock import loop_lag
from pglayer._context import RequestContext
from pglayer._errors import PglayerError, PoolOverloadedError, PoolTimeoutError
from pglayer._logs import Throttle, left_out

__all__ = [
    "BulkheadStats",
    "Event",
    "ExternalPoolStats",
    "Histogram",
    "Hook",
    "Observer",
    "PoolEvent",
    "PoolStats",
    "QueryEvent",
    "RequestSeries",
    "RequestStats",
    "RetryEvent",
    "SlowQuery",
    "log_events",
]


PoolEventKind = Literal[
    "acquired",
    "released",
    "acquire_timeout",
    "shed",
    "connection_opened",
    "connection_closed",
    "connection_lost",
    "connection_failed",
]


@dataclass(frozen=True, slots=True)
class PoolEvent:
    """Something the pool did. `seconds`: the wait (acquired) or the hold (released)."""

    pool: str
    kind: PoolEventKind
    seconds: float | None = None


@dataclass(frozen=True, slots=True)
class QueryEvent:
    """A statement finished. `statement` is the SQL text only, never parameter values."""

    pool: str
    statement: str
    seconds: float
    operation: str
    request_id: str
    error: str | None = None  # the pglayer error class name
    sqlstate: str | None = None


@dataclass(frozen=True, slots=True)
class RetryEvent:
    """A transient failure was retried (or, with `gave_up`, no longer)."""

    pool: str
    reason: str
    gave_up: bool = False


Event = PoolEvent | QueryEvent | RetryEvent
Hook = Callable[[Event], None]

_events_log = logging.getLogger("pglayer.events")


def log_events(event: Event) -> None:
    """A hook that logs every event at DEBUG on the `pglayer.events` logger."""
    if _events_log.isEnabledFor(logging.DEBUG):
        _events_log.debug(type(event).__name__, extra={"event": asdict(event)})


# Seconds; the last bucket catches everything slower.
BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Histogram:
    """Counts of observations per upper bound (seconds), with their sum."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]  # one more than bounds: the overflow bucket
    total: float

    @property
    def count(self) -> int:
        return sum(self.counts)

    def as_dict(self) -> dict[str, Any]:
        """Count, sum, p50/p95/p99 (bucket upper bounds, seconds) and cumulative buckets."""
        cumulative = 0
        buckets: dict[str, int] = {}
        for bound, c in zip((*self.bounds, float("inf")), self.counts, strict=True):
            cumulative += c
            buckets["+Inf" if bound == float("inf") else f"{bound:g}"] = cumulative

        def at(q: float) -> float | str | None:
            value = self.quantile(q)
            return "+Inf" if value == float("inf") else value

        return {
            "count": self.count,
            "sum_seconds": round(self.total, 6),
            "p50": at(0.5),
            "p95": at(0.95),
            "p99": at(0.99),
            "buckets": buckets,
        }

    def quantile(self, q: float) -> float | None:
        """Upper bound of the bucket holding quantile `q` (0..1); None when empty."""
        n = self.count
        if n == 0:
            return None
        rank = q * n
        seen = 0
        for bound, c in zip((*self.bounds, float("inf")), self.counts, strict=True):
            seen += c
            if seen >= rank:
                return bound
        return float("inf")


@dataclass(frozen=True, slots=True)
class BulkheadStats:
    """One kind of work in a pool: its cap, what it holds and awaits now, refusals so far."""

    cap: int
    in_use: int
    waiting: int
    refused: int  # at once: predicted to wait past the deadline, or the wait bound
    acquire_timeouts: int  # waited, and the deadline came first
    hold_seconds: float  # recent time a connection is held (moving average)


@dataclass(frozen=True, slots=True)
class ExternalPoolStats:
    """Another pool of this app on the same server (a SQLAlchemy engine's), as it reports."""

    max_size: int
    size: int
    idle: int
    in_use: int


@dataclass(frozen=True, slots=True)
class PoolStats:
    """A snapshot of one pool. Sizes are now; counters are since the process started."""

    name: str
    open: bool
    min_size: int
    max_size: int
    size: int
    idle: int
    in_use: int
    waiting: int
    acquisitions: int
    acquire_timeouts: int
    requests_shed: int
    connections_opened: int
    connections_closed: int
    connections_lost: int
    connections_failed: int
    slow_queries: int
    acquire_wait: Histogram
    hold_time: Histogram
    retries: dict[str, int] = field(default_factory=dict)
    give_ups: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    query_time: dict[str, Histogram] = field(default_factory=dict)
    bulkheads: dict[str, BulkheadStats] = field(default_factory=dict)
    external: dict[str, ExternalPoolStats] = field(default_factory=dict)
    # A replica's pool only (None otherwise): in rotation for reads, and how far behind
    # (None while unknown), as the primary's `ReplicaSet` last saw it.
    replica_healthy: bool | None = None
    replica_lag_seconds: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view with stable keys (histograms summarised)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Histogram):
                value = value.as_dict()
            elif f.name == "query_time":
                value = {op: h.as_dict() for op, h in value.items()}
            elif f.name in ("bulkheads", "external"):
                value = {name: asdict(b) for name, b in value.items()}
            out[f.name] = value
        return out


@dataclass(frozen=True, slots=True)
class SlowQuery:
    """One statement that took at least `slow_query_threshold`: its SQL text (never its
    parameters, clipped), the operation and request it ran for, and when it finished."""

    pool: str
    statement: str
    operation: str
    seconds: float
    request_id: str
    at: float  # wall clock (`time.time()`) when it finished
    error: str | None = None  # the exception's class name, if it failed


# The slow statements each pool keeps (the latest), and how much of each one's SQL text.
RECENT_SLOW_QUERIES = 20
MAX_RECENT_STATEMENT = 500


class _Recorder:
    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds

    def snapshot(self) -> Histogram:
        return Histogram(BUCKETS, tuple(self.counts), self.total)


# Query durations are kept per operation; past this many distinct names the rest share one.
MAX_OPERATIONS = 200
OTHER_OPERATIONS = "other"


class StatsRecorder:
    """Mutable counters behind `PoolStats`; cheap enough for every acquire."""

    def __init__(self) -> None:
        self.acquisitions = 0
        self.acquire_timeouts = 0
        self.requests_shed = 0
        self.connections_opened = 0
        self.connections_closed = 0
        self.connections_lost = 0
        self.connections_failed = 0
        self.slow_queries = 0
        self.retries: dict[str, int] = {}
        self.give_ups: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self._wait = _Recorder()
        self._hold = _Recorder()
        self._queries: dict[str, _Recorder] = {}
        self.recent_slow: deque[SlowQuery] = deque(maxlen=RECENT_SLOW_QUERIES)

    def acquired(self, waited: float) -> None:
        self.acquisitions += 1
        self._wait.observe(waited)

    def waited_in_vain(self, waited: float) -> None:
        """A wait that ended at its deadline: in the wait histogram too, or its p99 looked
        best exactly when the pool was worst (every long wait a timeout, left out)."""
        self._wait.observe(waited)

    def released(self, held: float) -> None:
        self._hold.observe(held)

    def acquire_timed_out(self) -> None:
        self.acquire_timeouts += 1

    def shed(self) -> None:
        self.requests_shed += 1

    def connection_opened(self) -> None:
        self.connections_opened += 1

    def connection_closed(self) -> None:
        self.connections_closed += 1

    def connection_lost(self) -> None:
        self.connections_lost += 1

    def query(self, operation: str, seconds: float) -> None:
        recorder = self._queries.get(operation)
        if recorder is None:
            if len(self._queries) >= MAX_OPERATIONS:
                operation = OTHER_OPERATIONS
            recorder = self._queries.setdefault(operation, _Recorder())
        recorder.observe(seconds)

    def slow_query(self, query: SlowQuery) -> None:
        self.slow_queries += 1
        self.recent_slow.append(query)

    def error(self, name: str) -> None:
        self.errors[name] = self.errors.get(name, 0) + 1

    def connection_failed(self) -> None:
        self.connections_failed += 1

    def retried(self, reason: str) -> None:
        self.retries[reason] = self.retries.get(reason, 0) + 1

    def gave_up(self, reason: str) -> None:
        self.give_ups[reason] = self.give_ups.get(reason, 0) + 1

    def snapshot(
        self,
        *,
        name: str,
        open: bool,
        min_size: int,
        max_size: int,
        size: int,
        idle: int,
        in_use: int,
        waiting: int,
        bulkheads: dict[str, BulkheadStats] | None = None,
        external: dict[str, ExternalPoolStats] | None = None,
        replica_healthy: bool | None = None,
        replica_lag_seconds: float | None = None,
    ) -> PoolStats:
        return PoolStats(
            name=name,
            open=open,
            min_size=min_size,
            max_size=max_size,
            size=size,
            idle=idle,
            in_use=in_use,
            waiting=waiting,
            acquisitions=self.acquisitions,
            acquire_timeouts=self.acquire_timeouts,
            requests_shed=self.requests_shed,
            connections_opened=self.connections_opened,
            connections_closed=self.connections_closed,
            connections_lost=self.connections_lost,
            connections_failed=self.connections_failed,
            slow_queries=self.slow_queries,
            acquire_wait=self._wait.snapshot(),
            hold_time=self._hold.snapshot(),
            retries=dict(self.retries),
            give_ups=dict(self.give_ups),
            errors=dict(self.errors),
            query_time={op: r.snapshot() for op, r in self._queries.items()},
            bulkheads=bulkheads or {},
            external=external or {},
            replica_healthy=replica_healthy,
            replica_lag_seconds=replica_lag_seconds,
        )


# HTTP series are kept per (method, route template, status); past this many the rest share
# the route `other`, so a flood of unmatched methods cannot grow memory without bound.
MAX_HTTP_SERIES = 500
# Methods counted by name; the parser knows ~30 more (WebDAV and the like), all answered 405:
# counted as `OTHER`, so they cannot multiply the series of every route.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


@dataclass(frozen=True, slots=True)
class RequestSeries:
    """Requests answered with one (method, route template, status), and their durations."""

    method: str
    route: str
    status: int
    duration: Histogram


class RequestStats:
    """HTTP requests by method, route template and status; one dict lookup per request."""

    __slots__ = ("_series",)

    def __init__(self) -> None:
        self._series: dict[tuple[str, str, int], _Recorder] = {}

    def record(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        recorder = self._series.get(key)
        if recorder is None:
            if method not in HTTP_METHODS:
                method = "OTHER"
            if len(self._series) >= MAX_HTTP_SERIES:
                route = OTHER_OPERATIONS
            recorder = self._series.setdefault((method, route, status), _Recorder())
        recorder.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        recorder.total += seconds

    def snapshot(self) -> list[RequestSeries]:
        return [
            RequestSeries(method, route, status, recorder.snapshot())
            for (method, route, status), recorder in list(self._series.items())
        ]


log = logging.getLogger("pglayer")
_HOOK_FAILED = Throttle()
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
                # Once a second per hook: a broken hook fails on every event alike.
                count = _HOOK_FAILED.allow(id(hook))
                if count is not None:
                    log.exception(
                        "instrumentation hook %r failed; ignored%s", hook, left_out(count)
                    )

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

    def waited_in_vain(self, waited: float) -> None:
        self.stats.waited_in_vain(waited)

    def acquire_failed(self, error: PglayerError) -> None:
        if isinstance(error, PoolOverloadedError):
            self.shed()
            return
        self.stats.error(type(error).__name__)
        if isinstance(error, PoolTimeoutError):
            self.stats.acquire_timed_out()
            self._pool_event("acquire_timeout")

    def shed(self) -> None:
        """A request refused for the pool's saturation (counted as a `PoolOverloadedError`,
        without building one: under a retry storm most requests are refusals)."""
        self.stats.error("PoolOverloadedError")
        self.stats.shed()
        self._pool_event("shed")

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
            # The time is the client's: under overload much of it can be the event loop
            # busy elsewhere before it read the answer. Said, so a fast statement is not
            # taken for a slow one.
            late = min(loop_lag(time.monotonic() - seconds), seconds)
            slow_log.warning(
                "slow query: %.3fs in %s: %s%s",
                seconds,
                operation,
                text,
                ""
                if late < seconds / 4
                else f" (the event loop ran {late:.3f}s late in all meanwhile: this time"
                " includes waiting for it, not only the database)",
                extra={
                    "duration_seconds": round(seconds, 6),
                    "operation": operation,
                    "statement": text,
                    "pool": self.pool,
                    "loop_lag_seconds": round(late, 6),
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
