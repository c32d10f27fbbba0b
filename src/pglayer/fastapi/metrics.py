"""HTTP and pool metrics for an app, exposed in Prometheus text format.

One registry per app. With several worker processes, see `setup_metrics`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Counter, multiprocess
from prometheus_client import Histogram as PromHistogram
from starlette.types import ASGIApp, Receive, Scope, Send

from pglayer.database import Database
from pglayer.fastapi.middleware import StatusNotingSend, route_template
from pglayer.metrics import PoolCollector, SharedPoolCollector

__all__ = ["HttpMetrics", "setup_metrics"]

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class HttpMetrics:
    """Counts requests by method, route template and status, and times them by route."""

    def __init__(self, app: ASGIApp, *, registry: CollectorRegistry | None) -> None:
        self.app = app
        self.requests = Counter(
            "pglayer_http_requests",
            "HTTP requests answered",
            ["method", "route", "status"],
            registry=registry,
        )
        self.duration = PromHistogram(
            "pglayer_http_request_duration_seconds",
            "Time to answer an HTTP request",
            ["method", "route"],
            registry=registry,
            buckets=_BUCKETS,
        )
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        noting = StatusNotingSend(send)
        try:
            await self.app(scope, receive, noting)
        finally:
            status = noting.status or 500  # nothing sent: the app raised
            # The template ("/users/{user_id}"), never the raw path: bounded label values.
            route = route_template(scope)
            key = (scope["method"], route, status)
            children = self._children.get(key)
            if children is None:
                # labels() takes a lock and builds a key each call; a bounded set of
                # (method, route template, status) makes caching the children safe.
                children = (
                    self.requests.labels(key[0], route, str(status)),
                    self.duration.labels(key[0], route),
                )
                self._children[key] = children
            children[0].inc()
            children[1].observe(time.perf_counter() - started)


def setup_metrics(
    app: FastAPI, db: Database, *, http: bool = True, multiprocess_dir: str | None = None
) -> CollectorRegistry:
    """Add pool metrics of `db` (and, with `http`, request metrics); return the registry.

    With several worker processes (`multiprocess_dir`, default `PROMETHEUS_MULTIPROC_DIR`),
    any worker answers for all: HTTP metrics use prometheus-client's multiprocess mode
    (summed over workers), pool metrics one series per worker (label `worker`).
    """
    directory = multiprocess_dir or os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    registry = CollectorRegistry(auto_describe=True)
    if directory is None:
        registry.register(PoolCollector(db.pools()))
    else:
        multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
        pools = SharedPoolCollector(db.pools(), directory)
        registry.register(pools)
        _publish_during_lifespan(app, pools)
    if http:
        # In multiprocess mode the values live in the shared files, not in a registry.
        app.add_middleware(HttpMetrics, registry=registry if directory is None else None)
    return registry


def _publish_during_lifespan(app: FastAPI, pools: SharedPoolCollector) -> None:
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app_: Any) -> AsyncIterator[Any]:
        task = asyncio.create_task(pools.publish_forever())
        try:
            async with inner(app_) as state:
                yield state
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            pools.remove()

    app.router.lifespan_context = lifespan
