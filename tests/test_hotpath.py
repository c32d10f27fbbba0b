"""The request path's cost, guarded without a clock: Python calls per `GET /users/{id}`.

Timing belongs to the benchmarks (`benchmarks/hotpath.py`); a call count is deterministic
for given library versions (pinned in `constraints.txt`), so it can fail a test. It is
counted as production runs: on uvloop, with the access log and metrics on. The budget is
below what the naive baseline (`benchmarks/baselines/naive.py`, the tutorial pattern) makes
for the same request, counted the same way: 493 calls with FastAPI 0.165, Starlette 1.10,
asyncpg 0.32, uvloop 0.23 (cProfile counts a coroutine once per resumption, and C calls).
"""

from __future__ import annotations

import asyncio
import cProfile
import gc
import logging
import os
import pstats
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import IO, Any

import pytest
import uvloop
from fastapi import FastAPI
from pglayer_shop.app import create_app
from pglayer_shop.settings import ShopSettings

from pglayer import Database, _gc
from pglayer.fastapi import setup
from tests.conftest import settings_for

CALL_BUDGET = 485  # per request; the naive baseline: 493 (the shop: 478 when written)
REQUESTS = 50


@pytest.fixture
def log_sink() -> Iterator[IO[str]]:
    """A sink for the log lines of the test; the root logger is restored afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    with open(os.devnull, "w") as sink:
        try:
            yield sink
        finally:
            for handler in list(root.handlers):
                root.removeHandler(handler)
            for handler in handlers:
                root.addHandler(handler)
            root.setLevel(level)


async def _get(app: Any, path: str) -> int:
    status = 0
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.get_running_loop().create_future()  # the client stays
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
        "scheme": "http",
        "method": "GET",
        "root_path": "",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1:8000")],
        "state": {},
    }
    await app(scope, receive, send)
    return status


def test_a_user_read_makes_fewer_calls_than_the_tutorial_pattern(
    db_url: str, log_sink: IO[str]
) -> None:
    calls = uvloop.run(_calls_per_user_read(db_url, log_sink))
    assert calls <= CALL_BUDGET, f"{calls:.0f} calls per request, budget {CALL_BUDGET}"


@asynccontextmanager
async def _serving_shop(db_url: str, log_sink: IO[str]) -> AsyncIterator[tuple[FastAPI, int]]:
    """The shop as `serve` runs it (metrics and the access log on, logs formatted by
    pglayer, to `log_sink`), started, with one user; yields the app and the user's id."""
    settings = ShopSettings(admin_token=None, access_log=True, log_format="text")
    app: FastAPI = create_app(db=Database(settings_for(db_url)), settings=settings)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(log_sink)
    async with app.router.lifespan_context(app):
        db: Database = app.state.pglayer_database
        user_id = await db.run(
            lambda c: c.fetchval(
                "INSERT INTO users (name, email) VALUES ('Ada', 'ada@example.com') RETURNING id"
            )
        )
        yield app, user_id


async def _calls_per_user_read(db_url: str, log_sink: IO[str]) -> float:
    async with _serving_shop(db_url, log_sink) as (app, user_id):
        path = f"/users/{user_id}"
        for _ in range(10):  # warm: statement cache, route caches
            assert await _get(app, path) == 200
        profile = cProfile.Profile()
        profile.enable()
        statuses = [await _get(app, path) for _ in range(REQUESTS)]
        profile.disable()
    assert statuses == [200] * REQUESTS
    return float(pstats.Stats(profile).total_calls) / REQUESTS  # type: ignore[attr-defined]


@pytest.fixture
def gc_restored() -> Iterator[None]:
    """Give the test process back the collector's settings a tuned startup changes."""
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)
    _gc._tuned = False


async def test_a_tuned_startup_freezes_its_heap_and_collects_the_young_less_often(
    db_url: str, gc_restored: None
) -> None:
    app = FastAPI()
    setup(app, Database(settings_for(db_url)), tune_gc=True)
    async with app.router.lifespan_context(app):
        assert gc.get_threshold()[0] == _gc.GC_THRESHOLD
        assert gc.get_freeze_count() > 0


async def test_the_collector_is_left_alone_unless_asked(db_url: str, gc_restored: None) -> None:
    threshold = gc.get_threshold()
    app = FastAPI()
    setup(app, Database(settings_for(db_url)))  # PGLAYER_TUNE_GC unset: off
    async with app.router.lifespan_context(app):
        assert gc.get_threshold() == threshold
        assert gc.get_freeze_count() == 0


def test_requests_leave_no_cyclic_garbage(db_url: str, log_sink: IO[str]) -> None:
    # What a tuned threshold relies on: a request's objects are freed by reference counting,
    # so the young collections are rare and nothing waits in memory for them.
    assert uvloop.run(_garbage_of_reads(db_url, log_sink)) == []


async def _garbage_of_reads(db_url: str, log_sink: IO[str]) -> list[str]:
    async with _serving_shop(db_url, log_sink) as (app, user_id):
        paths = [f"/users/{user_id}", f"/dashboard/{user_id}", "/users/999999999"]
        for path in paths:  # warm: statement cache, route caches
            await _get(app, path)
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for _ in range(20):
                for path in paths:
                    await _get(app, path)
            gc.collect()
            garbage = [type(o).__qualname__ for o in gc.garbage]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
    return garbage
