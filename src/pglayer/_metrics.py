"""Prometheus metrics of a pool, read from `Database.stats()` at scrape time.

Nothing is recorded per request for these: the pool's counters already exist, so a scrape
costs one snapshot and a request costs nothing extra.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import orjson
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from pglayer._database import Database
from pglayer._observability import (
    BulkheadStats,
    ExternalPoolStats,
    Histogram,
    PoolStats,
    RequestSeries,
    RequestStats,
)
from pglayer._process import alive, worker_deaths
from pglayer._retry import REASONS

__all__ = ["PoolCollector", "SharedPoolCollector", "Snapshot"]

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
    (
        "requests_shed",
        "Requests refused at once: their predicted wait was past their deadline, or too"
        " many were waiting",
    ),
    ("connections_opened", "Connections opened"),
    ("connections_closed", "Connections retired by the pool (idle lifetime, shutdown)"),
    ("connections_lost", "Connections that broke (server gone, network, killed backend)"),
    ("connections_failed", "Connection attempts that failed"),
    ("slow_queries", "Statements slower than the slow-query threshold"),
)


_BULKHEAD_SERIES = (
    ("cap", "Most connections the bulkhead may hold at once", "cap", "gauge"),
    ("in_use", "Connections the bulkhead holds now", "in_use", "gauge"),
    ("waiting", "Callers of the bulkhead waiting for a connection", "waiting", "gauge"),
    ("hold_seconds", "Recent time a connection is held (moving average)", "hold_seconds", "gauge"),
    ("refused", "Acquires refused at once (predicted wait past the deadline, or the bound)",
     "refused", "counter"),
    ("acquire_timeouts", "Acquires that waited past their deadline", "acquire_timeouts",
     "counter"),
)  # fmt: skip


# Error classes whose first occurrence alerts (`increase()` in deploy/prometheus): shown at 0
# from the start, since `increase()` cannot count the first value of a series that appears
# already above 0.
_ALERTED_ERRORS = dict.fromkeys(
    (
        "CommitIndeterminateError",
        "ProgrammingError",
        "TransactionAbortedError",
        "TransactionEndedError",
    ),
    0,
)
_REASONS_AT_ZERO = dict.fromkeys(REASONS, 0)  # so the first retry or give-up counts too
_AT_ZERO = {"errors": _ALERTED_ERRORS, "retries": _REASONS_AT_ZERO, "give_ups": _REASONS_AT_ZERO}


def _buckets(h: Histogram) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    cumulative = 0
    for bound, count in zip((*h.bounds, float("inf")), h.counts, strict=True):
        cumulative += count
        out.append(("+Inf" if bound == float("inf") else repr(bound), float(cumulative)))
    return out


Snapshot = tuple[list[PoolStats], list[RequestSeries]]


class PoolCollector(Collector):
    """Exposes `pglayer_pool_*` metrics for each database, labelled by pool name, and
    `pglayer_http_*` from `requests` (the guard's per-request records) when given."""

    def __init__(self, databases: Iterable[Database], requests: RequestStats | None = None) -> None:
        self.databases = list(databases)
        self.requests = requests

    def snapshot(self) -> Snapshot:
        http = self.requests.snapshot() if self.requests is not None else []
        return [db.stats() for db in self.databases], http

    def snapshots(self) -> list[tuple[Snapshot, str | None]]:
        return [(self.snapshot(), None)]

    def collect(self) -> Iterator[Metric]:
        per_worker = self.snapshots()
        yield from _families([(s, w) for (pools, _), w in per_worker for s in pools])
        yield from _http_families([(r, w) for (_, http), w in per_worker for r in http])


def _hist(h: dict[str, Any]) -> Histogram:
    return Histogram(tuple(h["bounds"]), tuple(h["counts"]), h["total"])


def _snapshot_to_json(snapshot: Snapshot) -> dict[str, Any]:
    pools, http = snapshot
    return {"pools": [asdict(s) for s in pools], "http": [asdict(r) for r in http]}


def _snapshot_from_json(data: dict[str, Any]) -> Snapshot:
    pools = []
    for item in data["pools"]:
        item = dict(item)
        item["acquire_wait"] = _hist(item["acquire_wait"])
        item["hold_time"] = _hist(item["hold_time"])
        item["query_time"] = {op: _hist(h) for op, h in item["query_time"].items()}
        item["bulkheads"] = {n: BulkheadStats(**b) for n, b in item["bulkheads"].items()}
        item["external"] = {n: ExternalPoolStats(**e) for n, e in item.get("external", {}).items()}
        pools.append(PoolStats(**item))
    http = [
        RequestSeries(r["method"], r["route"], r["status"], _hist(r["duration"]))
        for r in data["http"]
    ]
    return pools, http


class SharedPoolCollector(PoolCollector):
    """Pool metrics of every worker process, from snapshots they write to `directory`.

    Each worker has its own pool, so each keeps its own series, labelled `worker` (its
    PID); sum them in queries (`sum without (worker) (...)`). A worker refreshes its file
    every `interval` seconds and when it is scraped; files of exited workers are ignored.
    """

    def __init__(
        self,
        databases: Iterable[Database],
        directory: str | Path,
        *,
        requests: RequestStats | None = None,
        interval: float = 1.0,
    ) -> None:
        super().__init__(databases, requests)
        self.directory = Path(directory)
        self.interval = interval
        self._path = self.directory / f"pglayer-pools-{os.getpid()}.json"

    def write(self) -> None:
        """Publish this worker's snapshot (atomically, for concurrent readers)."""
        body = orjson.dumps(_snapshot_to_json(self.snapshot()))
        tmp = self._path.with_suffix(".tmp")
        tmp.write_bytes(body)
        tmp.replace(self._path)

    def remove(self) -> None:
        self._path.unlink(missing_ok=True)

    async def publish_forever(self) -> None:
        """Write the snapshot every `interval` seconds until cancelled."""
        while True:
            self.write()
            await asyncio.sleep(self.interval)

    def collect(self) -> Iterator[Metric]:
        yield from super().collect()
        yield CounterMetricFamily(
            "pglayer_worker_deaths",
            "Worker processes that died (killed, out of memory, crashed) and were replaced",
            value=float(worker_deaths(self.directory)),
        )

    def snapshots(self) -> list[tuple[Snapshot, str | None]]:
        self.write()
        out: list[tuple[Snapshot, str | None]] = []
        stale_before = time.time() - max(10 * self.interval, 10.0)
        for path in sorted(self.directory.glob("pglayer-pools-*.json")):
            pid = path.stem.rsplit("-", 1)[1]
            try:
                if path.stat().st_mtime < stale_before or not alive(int(pid)):
                    continue
                snapshot = _snapshot_from_json(orjson.loads(path.read_bytes()))
            except (OSError, ValueError, KeyError, TypeError):
                continue  # removed, half-written or from an older version: skip it
            out.append((snapshot, pid))
        return out


def _families(snapshots_with_worker: list[tuple[PoolStats, str | None]]) -> Iterator[Metric]:
    per_worker = any(worker is not None for _, worker in snapshots_with_worker)
    extra = ["worker"] if per_worker else []
    snapshots = [s for s, _ in snapshots_with_worker]
    workers = [[w] if per_worker and w is not None else [] for _, w in snapshots_with_worker]
    for field, doc in _GAUGES:
        gauge = GaugeMetricFamily(f"pglayer_pool_{field}", doc, labels=["pool", *extra])
        for s, w in zip(snapshots, workers, strict=True):
            gauge.add_metric([s.name, *w], float(getattr(s, field)))
        yield gauge
    for field, doc in _COUNTERS:
        counter = CounterMetricFamily(f"pglayer_pool_{field}", doc, labels=["pool", *extra])
        for s, w in zip(snapshots, workers, strict=True):
            counter.add_metric([s.name, *w], float(getattr(s, field)))
        yield counter
    for name, doc, attr, label in (
        ("retries", "Retries of transient failures", "retries", "reason"),
        ("give_ups", "Transient failures given up on", "give_ups", "reason"),
        ("errors", "Errors raised, by pglayer error class", "errors", "error"),
    ):
        by_key = CounterMetricFamily(f"pglayer_{name}", doc, labels=["pool", label, *extra])
        for s, w in zip(snapshots, workers, strict=True):
            counts = {**_AT_ZERO[attr], **getattr(s, attr)}
            for key, value in counts.items():
                by_key.add_metric([s.name, key, *w], float(value))
        yield by_key
    for name, doc, attr, kind in _BULKHEAD_SERIES:
        family = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(
            f"pglayer_bulkhead_{name}", doc, labels=["pool", "bulkhead", *extra]
        )
        for s, w in zip(snapshots, workers, strict=True):
            for bulkhead, b in s.bulkheads.items():
                family.add_metric([s.name, bulkhead, *w], float(getattr(b, attr)))
        yield family
    queries = HistogramMetricFamily(
        "pglayer_query_duration_seconds",
        "Statement durations by operation (route template or pglayer.operation name)",
        labels=["pool", "operation", *extra],
    )
    for s, w in zip(snapshots, workers, strict=True):
        for op, per_op in s.query_time.items():
            queries.add_metric([s.name, op, *w], _buckets(per_op), sum_value=per_op.total)
    yield queries
    for name, doc, attr in (
        (
            "acquire_wait_seconds",
            "Time waited for a connection, waits that timed out included",
            "acquire_wait",
        ),
        ("hold_seconds", "Time a connection was held", "hold_time"),
    ):
        hist = HistogramMetricFamily(f"pglayer_pool_{name}", doc, labels=["pool", *extra])
        for s, w in zip(snapshots, workers, strict=True):
            h: Histogram = getattr(s, attr)
            hist.add_metric([s.name, *w], _buckets(h), sum_value=h.total)
        yield hist
    yield from _replica_families(snapshots, workers, extra)


def _replica_families(
    snapshots: list[PoolStats], workers: list[list[str]], extra: list[str]
) -> Iterator[Metric]:
    """Each replica pool's rotation state and lag (from the primary's `ReplicaSet`)."""
    rotation = GaugeMetricFamily(
        "pglayer_replica_in_rotation",
        "1 while reads may use this replica (reachable, a standby, within the lag bound)",
        labels=["pool", *extra],
    )
    lag = GaugeMetricFamily(
        "pglayer_replica_lag_seconds",
        "Seconds this replica's replay is behind the primary (absent while unknown)",
        labels=["pool", *extra],
    )
    for s, w in zip(snapshots, workers, strict=True):
        if s.replica_healthy is None:
            continue  # not a replica
        rotation.add_metric([s.name, *w], 1.0 if s.replica_healthy else 0.0)
        if s.replica_lag_seconds is not None:
            lag.add_metric([s.name, *w], float(s.replica_lag_seconds))
    yield rotation
    yield lag


def _http_families(series: list[tuple[RequestSeries, str | None]]) -> Iterator[Metric]:
    per_worker = any(worker is not None for _, worker in series)
    extra = ["worker"] if per_worker else []
    requests = CounterMetricFamily(
        "pglayer_http_requests",
        "HTTP requests answered, by method, route template and status",
        labels=["method", "route", "status", *extra],
    )
    # Durations by (method, route): the statuses' histograms added up.
    durations: dict[tuple[str, ...], list[Histogram]] = {}
    for r, worker in series:
        w = [worker] if per_worker and worker is not None else []
        requests.add_metric([r.method, r.route, str(r.status), *w], float(r.duration.count))
        durations.setdefault((r.method, r.route, *w), []).append(r.duration)
    yield requests
    seconds = HistogramMetricFamily(
        "pglayer_http_request_duration_seconds",
        "Time to answer an HTTP request, by method and route template",
        labels=["method", "route", *extra],
    )
    for labels, hists in durations.items():
        total = Histogram(
            hists[0].bounds,
            tuple(sum(c) for c in zip(*(h.counts for h in hists), strict=True)),
            sum(h.total for h in hists),
        )
        seconds.add_metric(list(labels), _buckets(total), sum_value=total.total)
    yield seconds
