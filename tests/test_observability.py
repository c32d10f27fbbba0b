"""Counters, hooks, the slow-query log and structured logs move exactly as scripted."""

from __future__ import annotations

import asyncio
import io
import logging
import time
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from pglayer_shop.app import create_app
from pglayer_shop.settings import ShopSettings

from pglayer import Database, PoolTimeoutError, UniqueViolationError
from pglayer import _context as context
from pglayer._errors import InvalidInputError
from pglayer._logs import JsonFormatter, MaskSecrets, install_request_id
from pglayer._observability import Event, PoolEvent, QueryEvent
from tests.conftest import asgi_client, settings_for, wait_for
from tests.test_metrics import scrape, value


async def test_a_terminated_backend_is_one_lost_connection(
    db_url: str, admin: asyncpg.Connection[Any]
) -> None:
    async with Database(settings_for(db_url, min_size=1, max_size=1)) as db:
        pid = await db.run(lambda conn: conn.fetchval("SELECT pg_backend_pid()"))
        await admin.execute("SELECT pg_terminate_backend($1)", pid)

        async def lost() -> bool:
            return db.stats().connections_lost == 1

        assert await wait_for(lost)
        assert await db.run(lambda conn: conn.fetchval("SELECT 1")) == 1
        stats = db.stats()
        assert (stats.connections_lost, stats.connections_closed) == (1, 0)


async def test_an_idle_connection_retired_by_the_pool_is_closed_not_lost(db_url: str) -> None:
    settings = settings_for(db_url, min_size=0, max_size=1, max_inactive_connection_lifetime=0.1)
    async with Database(settings) as db:
        await db.run(lambda conn: conn.fetchval("SELECT 1"))

        async def retired() -> bool:
            return db.stats().connections_closed == 1

        assert await wait_for(retired)
        assert db.stats().connections_lost == 0


async def test_errors_are_counted_by_class(db_url: str) -> None:
    async with Database(settings_for(db_url, min_size=1, max_size=1)) as db:
        async with db.connection() as conn:
            await conn.execute("INSERT INTO users (name, email) VALUES ('a', 'a@x.test')")
            with pytest.raises(UniqueViolationError):
                await conn.execute("INSERT INTO users (name, email) VALUES ('b', 'a@x.test')")
            with pytest.raises(InvalidInputError):
                await conn.fetchval("SELECT 1 / 0")
            with pytest.raises(PoolTimeoutError):
                async with db.connection(timeout=0.05):
                    pass
        assert db.stats().errors == {
            "UniqueViolationError": 1,
            "InvalidInputError": 1,
            "PoolTimeoutError": 1,
        }


async def test_hooks_see_each_event_with_its_operation_and_request_id(db_url: str) -> None:
    events: list[Event] = []
    async with Database(settings_for(db_url, min_size=1, max_size=1), hooks=[events.append]) as db:
        events.clear()  # the connections opened by open()
        with context.request_id("req-7"), context.operation("nightly-report"):
            async with db.connection() as conn:
                await conn.fetchval("SELECT $1::int", 1)
    kinds = [e.kind if isinstance(e, PoolEvent) else type(e).__name__ for e in events]
    assert kinds[:3] == ["acquired", "QueryEvent", "released"]
    query = events[1]
    assert isinstance(query, QueryEvent)
    assert (query.statement, query.operation, query.request_id) == (
        "SELECT $1::int",
        "nightly-report",
        "req-7",
    )
    assert query.error is None
    assert query.seconds > 0


async def test_a_failing_hook_is_logged_and_never_fails_the_query(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(event: Event) -> None:
        raise RuntimeError("hook bug")

    async with Database(settings_for(db_url, min_size=1, max_size=1)) as db:
        db.add_hook(broken)
        for _ in range(20):
            assert await db.run(lambda conn: conn.fetchval("SELECT 42")) == 42
    said = [r for r in caplog.records if "instrumentation hook" in r.getMessage()]
    assert len(said) == 1  # once a second, not once per event (dozens here)


async def test_slow_queries_are_logged_without_parameters_and_with_the_request_id(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    install_request_id()
    settings = settings_for(db_url, slow_query_threshold=0.05)
    caplog.set_level(logging.WARNING, logger="pglayer.slow_query")
    async with Database(settings) as db:
        with context.request_id("req-slow"):
            async with db.connection() as conn:
                await conn.execute("SELECT pg_sleep($1::float8), $2::text", 0.1, "card-4242")
                await conn.execute("SELECT $1::text", "fast")
        assert db.stats().slow_queries == 1
    [record] = [r for r in caplog.records if r.name == "pglayer.slow_query"]
    line = JsonFormatter().format(record)
    parsed = orjson.loads(line)
    assert parsed["statement"] == "SELECT pg_sleep($1::float8), $2::text"
    assert parsed["request_id"] == "req-slow"
    assert parsed["duration_seconds"] >= 0.1
    assert "card-4242" not in line


@pytest.mark.parametrize("blocked", [0.0, 0.3])
async def test_a_slow_query_says_when_the_event_loop_was_late_meanwhile(
    db_url: str, caplog: pytest.LogCaptureFixture, blocked: float
) -> None:
    settings = settings_for(db_url, slow_query_threshold=0.05)
    caplog.set_level(logging.WARNING, logger="pglayer.slow_query")
    loop = asyncio.get_running_loop()
    async with Database(settings) as db:
        # The loop busy elsewhere (blocked) while a fast statement's answer waits for it.
        loop.call_later(0.02, time.sleep, blocked)
        await db.run(lambda conn: conn.execute("SELECT pg_sleep(0.1)"))
    [record] = [r for r in caplog.records if r.name == "pglayer.slow_query"]
    said = "the event loop ran" in record.getMessage()
    assert said == bool(blocked), record.getMessage()
    assert getattr(record, "loop_lag_seconds") >= blocked - 0.1  # noqa: B009


async def test_a_slow_query_counts_every_stall_of_the_loop_meanwhile(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The worst single stall (0.12 s) is under a quarter of the statement's time, their sum
    # (0.48 s) is not: said as the database's time, it blamed the database.
    settings = settings_for(db_url, slow_query_threshold=0.05)
    caplog.set_level(logging.WARNING, logger="pglayer.slow_query")
    loop = asyncio.get_running_loop()
    async with Database(settings) as db:
        for at in (0.05, 0.25, 0.45, 0.65):
            loop.call_later(at, time.sleep, 0.12)
        await db.run(lambda conn: conn.execute("SELECT pg_sleep(0.8)"))
    [record] = [r for r in caplog.records if r.name == "pglayer.slow_query"]
    assert "the event loop ran" in record.getMessage(), record.getMessage()
    assert getattr(record, "loop_lag_seconds") >= 0.3  # noqa: B009


async def test_a_greater_lag_just_before_a_slow_query_does_not_hide_its_own(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(db_url, slow_query_threshold=0.05)
    caplog.set_level(logging.WARNING, logger="pglayer.slow_query")
    loop = asyncio.get_running_loop()
    async with Database(settings) as db, db.connection() as conn:
        loop.call_later(0.02, time.sleep, 0.3)
        await conn.execute("SELECT pg_sleep(0.05)")
        caplog.clear()
        loop.call_later(0.02, time.sleep, 0.2)  # less than the first, within its second
        await conn.execute("SELECT pg_sleep(0.05)")
    [record] = [r for r in caplog.records if r.name == "pglayer.slow_query"]
    assert getattr(record, "loop_lag_seconds") >= 0.1  # noqa: B009


def test_json_lines_mask_passwords_anywhere_in_the_message() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(MaskSecrets())
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("pglayer.test-json")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with context.request_id("r-1"):
            logger.warning(
                "cannot reach %s (also tried host=h password=hunter3)",
                "postgresql://shop:hunter2@db.internal:5432/shop",
            )
    finally:
        logger.removeHandler(handler)
    line = stream.getvalue()
    parsed = orjson.loads(line)
    assert parsed["request_id"] == "r-1"
    assert parsed["level"] == "warning"
    assert "hunter2" not in line
    assert "hunter3" not in line
    assert "postgresql://shop:***@db.internal:5432/shop" in parsed["message"]


async def test_access_log_line_carries_the_callers_request_id_and_route(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    install_request_id()
    caplog.set_level(logging.INFO, logger="pglayer.access")
    app = create_app(db=db, settings=ShopSettings(access_log=True))
    async with app.router.lifespan_context(app), asgi_client(app) as client:
        response = await client.get("/users/999", headers={"X-Request-ID": "req-42"})
    assert response.headers["x-request-id"] == "req-42"
    [record] = [r for r in caplog.records if r.name == "pglayer.access"]
    parsed = orjson.loads(JsonFormatter().format(record))
    assert parsed["request_id"] == "req-42"
    assert (parsed["route"], parsed["status"], parsed["method"]) == ("/users/{user_id}", 404, "GET")


async def test_query_time_is_attributed_to_the_route_template(
    client: httpx.AsyncClient, db: Database
) -> None:
    for i in range(3):
        await client.get(f"/users/{i + 1}")
    assert db.stats().query_time["/users/{user_id}"].count == 3
    samples = await scrape(client)
    labels = {"pool": "primary", "operation": "/users/{user_id}"}
    assert value(samples, "pglayer_query_duration_seconds_count", **labels) == 3


async def test_concurrent_requests_keep_their_own_request_ids(
    db_url: str,
) -> None:
    seen: dict[str, str] = {}

    def hook(event: Event) -> None:
        if isinstance(event, QueryEvent):
            seen[event.request_id] = event.operation

    db = Database(settings_for(db_url), hooks=[hook])
    app = create_app(db=db, settings=ShopSettings())
    async with app.router.lifespan_context(app), asgi_client(app) as client:
        ids = [f"req-{i}" for i in range(20)]
        await asyncio.gather(
            *(
                client.get(f"/users/{i + 1}", headers={"X-Request-ID": rid})
                for i, rid in enumerate(ids)
            )
        )
    assert {rid: seen.get(rid) for rid in ids} == dict.fromkeys(ids, "/users/{user_id}")


async def test_a_saturated_pool_sheds_before_routing_but_serves_health(db_url: str) -> None:
    db = Database(settings_for(db_url, min_size=1, max_size=1, max_waiters=1))
    app = create_app(db=db, settings=ShopSettings())
    async with app.router.lifespan_context(app), asgi_client(app) as client:
        async with db.connection():  # the only connection, held
            waiter = asyncio.create_task(client.get("/users/1"))  # the one allowed to wait
            await wait_for(lambda: asyncio.sleep(0, db.saturated() is not None))
            shed = await client.get("/users/2", headers={"X-Request-ID": "shed-1"})
            live = await client.get("/health/live")
        assert (await waiter).status_code == 404
    assert shed.status_code == 503
    assert shed.json()["code"] == "overloaded"
    assert shed.headers["retry-after"]
    assert shed.headers["x-request-id"] == "shed-1"
    assert live.status_code == 200
    assert db.stats().requests_shed == 1
