"""HTTP and pool metrics for an app, exposed in Prometheus text format.

One registry per app, in this process. With several worker processes each worker has its
own; see the README for how to scrape them.
"""

from __future__ import annotations

import time

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Counter
from prometheus_client import Histogram as PromHistogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pglayer.database import Database
from pglayer.metrics import PoolCollector

__all__ = ["HttpMetrics", "setup_metrics"]

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class HttpMetrics:
    """Counts requests by method, route template and status, and times them by route."""

    def __init__(self, app: ASGIApp, *, registry: CollectorRegistry) -> None:
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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            # The template ("/users/{user_id}"), never the raw path: bounded label values.
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope["method"]
            self.requests.labels(method, route, str(status)).inc()
            self.duration.labels(method, route).observe(time.perf_counter() - started)


def setup_metrics(app: FastAPI, db: Database, *, http: bool = True) -> CollectorRegistry:
    """Add pool metrics of `db` (and, with `http`, request metrics); return the registry."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(PoolCollector([db]))
    if http:
        app.add_middleware(HttpMetrics, registry=registry)
    return registry
