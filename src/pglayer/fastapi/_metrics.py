"""HTTP and pool metrics for an app, exposed in Prometheus text format.

Nothing is timed here: `RequestGuard` records each request into the app's `RequestStats`
(one dict lookup), and the collectors read those and the pools' counters at scrape time.
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
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.responses import Response

from pglayer._database import Database
from pglayer._metrics import PoolCollector, SharedPoolCollector
from pglayer._observability import RequestStats
from pglayer._settings import ServerSettings
from pglayer.fastapi._middleware import STATS_KEY

__all__ = ["setup_metrics"]


def setup_metrics(
    app: FastAPI,
    db: Database,
    *,
    path: str | None = "/metrics",
    http: bool | None = None,
    multiprocess_dir: str | None = None,
) -> CollectorRegistry:
    """Expose pool metrics of `db` (and, with `http`, default `PGLAYER_METRICS`, request
    metrics) at `path`.

    Returns the registry (`path=None` mounts no route: serve it yourself). With several
    worker processes (`multiprocess_dir`, default `PROMETHEUS_MULTIPROC_DIR`), any worker
    answers for all: each publishes its snapshot there every second, and every series
    carries the label `worker` (its PID); sum them in queries.
    """
    directory = multiprocess_dir or os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if http is None:
        http = ServerSettings().metrics
    requests = RequestStats() if http else None
    if requests is not None:
        setattr(app.state, STATS_KEY, requests)
    registry = CollectorRegistry(auto_describe=True)
    if directory is None:
        registry.register(PoolCollector(db.pools(), requests))
    else:
        shared = SharedPoolCollector(db.pools(), directory, requests=requests)
        registry.register(shared)
        _publish_during_lifespan(app, shared)
    if path is not None:
        _mount(app, path, registry)
    return registry


# Rendering runs on the event loop, and a flood of scrapes starved the requests being
# served. Each rendering books `_SHARE` times its duration; while the bookings run more than
# `_BURST` seconds ahead, the last rendering is answered again. Scrapes a few seconds apart
# (or a test's, a few in a row) are always rendered afresh; a flood takes a tenth of the CPU.
_SHARE = 10
_BURST = 1.0


def _mount(app: FastAPI, path: str, registry: CollectorRegistry) -> None:
    booked, body = 0.0, b""

    async def metrics() -> Response:
        """Prometheus text exposition: pool state and counters, HTTP requests by route."""
        nonlocal booked, body
        started = time.monotonic()
        if booked - started < _BURST:
            body = generate_latest(registry)
            ended = time.monotonic()
            booked = max(booked, started) + (ended - started) * _SHARE
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    app.add_api_route(
        path,
        metrics,
        methods=["GET"],
        tags=["health"],
        response_class=Response,
        responses={
            200: {
                "description": "Prometheus text exposition format 0.0.4",
                "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
            }
        },
    )


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
