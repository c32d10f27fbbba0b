"""`/metrics`: valid Prometheus text whose values move exactly with traffic."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from pglayer import Database
from pglayer.fastapi import _metrics
from tests.conftest import asgi_client


async def scrape(client: httpx.AsyncClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):  # raises on invalid text
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_count_requests_by_route_template_and_status(
    client: httpx.AsyncClient,
) -> None:
    before = await scrape(client)
    for i in range(3):
        assert (await client.get(f"/users/{i + 1000}")).status_code == 404
    assert (await client.get("/users/0")).status_code == 422
    after = await scrape(client)
    route = {"method": "GET", "route": "/users/{user_id}"}
    assert (
        value(after, "pglayer_http_requests_total", **route, status="404")
        - value(before, "pglayer_http_requests_total", **route, status="404")
        == 3
    )
    assert value(after, "pglayer_http_requests_total", **route, status="422") == 1
    assert (
        value(after, "pglayer_http_request_duration_seconds_count", **route)
        - value(before, "pglayer_http_request_duration_seconds_count", **route)
        == 4
    )
    # Raw paths never become label values.
    assert not any("1001" in dict(labels).get("route", "") for _, labels in after)


async def test_pool_metrics_mirror_the_pool_statistics(
    client: httpx.AsyncClient, db: Database
) -> None:
    await client.get("/users/1")
    samples = await scrape(client)
    stats = db.stats()
    pool = {"pool": "primary"}
    assert value(samples, "pglayer_pool_max_size", **pool) == stats.max_size
    assert value(samples, "pglayer_pool_in_use", **pool) == 0
    assert value(samples, "pglayer_pool_acquisitions_total", **pool) == stats.acquisitions
    assert (
        value(samples, "pglayer_pool_acquire_wait_seconds_count", **pool)
        == stats.acquire_wait.count
    )
    assert (
        value(samples, "pglayer_pool_acquire_wait_seconds_bucket", **pool, le="+Inf")
        == stats.acquisitions
    )


async def test_the_error_classes_alerted_on_first_sight_are_exported_at_zero(
    client: httpx.AsyncClient,
) -> None:
    # `increase()` cannot count the first value of a series that appears above 0: the first
    # commit of unknown outcome would never alert.
    samples = await scrape(client)
    alerted = ("CommitIndeterminateError", "ProgrammingError", "TransactionAbortedError")
    for error in (*alerted, "TransactionEndedError"):
        key = ("pglayer_errors_total", (("error", error), ("pool", "primary")))
        assert samples.get(key) == 0.0, error


async def test_retries_and_give_ups_are_exported_at_zero_for_every_reason(
    client: httpx.AsyncClient,
) -> None:
    samples = await scrape(client)
    for name in ("pglayer_retries_total", "pglayer_give_ups_total"):
        for reason in ("deadlock", "serialization_failure", "connection_lost", "unavailable"):
            key = (name, (("pool", "primary"), ("reason", reason)))
            assert samples.get(key) == 0.0, (name, reason)


async def test_methods_outside_the_common_seven_are_counted_as_other(
    client: httpx.AsyncClient,
) -> None:
    for method in ("PROPFIND", "MKCOL", "PURGE"):
        assert (await client.request(method, "/users/1")).status_code == 405
    assert (await client.request("PUT", "/users/1")).status_code == 405
    samples = await scrape(client)
    route = {"route": "/users/{user_id}", "status": "405"}
    assert value(samples, "pglayer_http_requests_total", method="OTHER", **route) == 3
    assert value(samples, "pglayer_http_requests_total", method="PUT", **route) == 1
    methods = {dict(labels).get("method") for _, labels in samples}
    assert not methods & {"PROPFIND", "MKCOL", "PURGE"}


class SlowCollector:
    """Takes 20 ms of the event loop per rendering, as a big exposition does."""

    def __init__(self) -> None:
        self.renderings = 0

    def collect(self) -> Iterator[GaugeMetricFamily]:
        self.renderings += 1
        time.sleep(0.02)
        yield GaugeMetricFamily("renderings", "times rendered", value=self.renderings)


async def test_a_flood_of_scrapes_renders_a_bounded_share_of_the_time() -> None:
    registry = CollectorRegistry(auto_describe=False)
    slow = SlowCollector()
    registry.register(slow)
    app = FastAPI()
    _metrics._mount(app, "/metrics", registry)
    async with asgi_client(app) as client:
        started = time.monotonic()
        for _ in range(100):
            assert (await client.get("/metrics")).status_code == 200
        took = time.monotonic() - started
    # A tenth of the time it took, plus the first second's burst: not one per scrape.
    assert slow.renderings <= (took / 10 + 1.0) / 0.02 + 1, (slow.renderings, took)
    assert slow.renderings < 100
