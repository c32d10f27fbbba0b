"""Pool statistics: live sizes and counters since start, with stable names."""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import asdict, dataclass, field, fields
from typing import Any

__all__ = [
    "BulkheadStats",
    "ExternalPoolStats",
    "Histogram",
    "PoolStats",
    "RequestSeries",
    "RequestStats",
    "SlowQuery",
]

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
            if len(self._series) >= MAX_HTTP_SERIES:
                key = (method, OTHER_OPERATIONS, status)
            recorder = self._series.setdefault(key, _Recorder())
        recorder.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        recorder.total += seconds

    def snapshot(self) -> list[RequestSeries]:
        return [
            RequestSeries(method, route, status, recorder.snapshot())
            for (method, route, status), recorder in list(self._series.items())
        ]
