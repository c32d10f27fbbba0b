"""Prometheus metrics of a pool, read from `Database.stats()` at scrape time.

Nothing is recorded per request for these: the pool's counters already exist, so a scrape
costs one snapshot and a request costs nothing extra.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from pglayer.database import Database
from pglayer.stats import Histogram

__all__ = ["PoolCollector"]

_GAUGES = (
    ("size", "Connections open in the pool"),
    ("idle", "Connections idle in the pool"),
    ("in_use", "Connections held by callers"),
    ("waiting", "Callers waiting for a connection"),
    ("min_size", "Configured minimum pool size"),
    ("max_size", "Configured maximum pool size"),
)
_COUNTERS = (
    ("acquisitions", "Connections handed out"),
    ("acquire_timeouts", "Acquires that passed their deadline"),
    ("requests_shed", "Acquires refused at once because too many were waiting"),
    ("connections_opened", "Connections opened"),
    ("connections_closed", "Connections retired by the pool (idle lifetime, shutdown)"),
    ("connections_lost", "Connections that broke (server gone, network, killed backend)"),
    ("connections_failed", "Connection attempts that failed"),
    ("slow_queries", "Statements slower than the slow-query threshold"),
)


def _buckets(h: Histogram) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    cumulative = 0
    for bound, count in zip((*h.bounds, float("inf")), h.counts, strict=True):
        cumulative += count
        out.append(("+Inf" if bound == float("inf") else repr(bound), float(cumulative)))
    return out


class PoolCollector(Collector):
    """Exposes `pglayer_pool_*` metrics for each database, labelled by pool name."""

    def __init__(self, databases: Iterable[Database]) -> None:
        self.databases = list(databases)

    def collect(self) -> Iterator[Metric]:
        snapshots = [db.stats() for db in self.databases]
        for field, doc in _GAUGES:
            gauge = GaugeMetricFamily(f"pglayer_pool_{field}", doc, labels=["pool"])
            for s in snapshots:
                gauge.add_metric([s.name], float(getattr(s, field)))
            yield gauge
        for field, doc in _COUNTERS:
            counter = CounterMetricFamily(f"pglayer_pool_{field}", doc, labels=["pool"])
            for s in snapshots:
                counter.add_metric([s.name], float(getattr(s, field)))
            yield counter
        for name, doc, attr, label in (
            ("retries", "Retries of transient failures", "retries", "reason"),
            ("give_ups", "Transient failures given up on", "give_ups", "reason"),
            ("errors", "Errors raised, by pglayer error class", "errors", "error"),
        ):
            by_key = CounterMetricFamily(f"pglayer_{name}", doc, labels=["pool", label])
            for s in snapshots:
                for key, value in getattr(s, attr).items():
                    by_key.add_metric([s.name, key], float(value))
            yield by_key
        queries = HistogramMetricFamily(
            "pglayer_query_duration_seconds",
            "Statement durations by operation (route template or pglayer.operation name)",
            labels=["pool", "operation"],
        )
        for s in snapshots:
            for op, per_op in s.query_time.items():
                queries.add_metric([s.name, op], _buckets(per_op), sum_value=per_op.total)
        yield queries
        for name, doc, attr in (
            ("acquire_wait_seconds", "Time waited for a connection", "acquire_wait"),
            ("hold_seconds", "Time a connection was held", "hold_time"),
        ):
            hist = HistogramMetricFamily(f"pglayer_pool_{name}", doc, labels=["pool"])
            for s in snapshots:
                h: Histogram = getattr(s, attr)
                hist.add_metric([s.name], _buckets(h), sum_value=h.total)
            yield hist
