"""`ndjson_response`: every row, one batch in memory, released when the client goes away."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from fastapi import FastAPI
from starlette.responses import Response

from pglayer import Database
from pglayer._http import PROTOCOL
from pglayer.fastapi import json_response, setup
from pglayer.fastapi._streaming import NDJSON, ndjson_response
from tests.conftest import LiveServer, asgi_client, settings_for, wait_for

ROWS = "SELECT g AS id, 'row ' || g AS name FROM generate_series(1, $1::int) AS g"


def streaming_app(db: Database, *, access_log: bool = False) -> FastAPI:
    app = FastAPI()
    setup(app, db, access_log=access_log)

    @app.get("/rows")
    async def rows(n: int, batch: int = 100) -> Response:
        return await ndjson_response(db, ROWS, n, batch=batch)

    return app


async def test_every_row_is_streamed_as_one_json_line(db: Database) -> None:
    async with asgi_client(streaming_app(db)) as client:
        response = await client.get("/rows", params={"n": 1234})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/x-ndjson"
    lines = response.content.splitlines()
    assert len(lines) == 1234
    assert orjson.loads(lines[-1]) == {"id": 1234, "name": "row 1234"}
    assert db.stats().in_use == 0


async def test_rows_arrive_one_batch_per_chunk(db: Database) -> None:
    async with (
        LiveServer(streaming_app(db)) as server,
        httpx.AsyncClient() as client,
        client.stream("GET", f"{server.url}/rows", params={"n": 1000}) as response,
    ):
        chunks = [chunk async for chunk in response.aiter_raw()]
    sizes = [chunk.count(b"\n") for chunk in chunks if chunk]
    assert sum(sizes) == 1000
    assert max(sizes) <= 100  # never more than one batch at once


@pytest.mark.parametrize("http", ["httptools", PROTOCOL])
async def test_a_client_that_leaves_releases_the_connection(db: Database, http: str) -> None:
    async with LiveServer(streaming_app(db), http=http) as server, httpx.AsyncClient() as client:
        async with client.stream(
            "GET", f"{server.url}/rows", params={"n": 1_000_000, "batch": 1000}
        ) as response:
            async for _ in response.aiter_raw():
                break  # read one chunk, then hang up
        for _ in range(100):
            if db.stats().in_use == 0:
                break
            await asyncio.sleep(0.05)
    assert db.stats().in_use == 0
    count = await db.run(
        lambda conn: conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'"
            " AND datname = current_database()"
        )
    )
    assert count == 0


async def test_a_first_batch_that_fails_answers_its_own_error(db_url: str) -> None:
    async with Database(settings_for(db_url, lock_timeout=0.3)) as db:
        await db.run(lambda conn: conn.execute("CREATE TABLE held (id int)"))
        app = FastAPI()
        setup(app, db)

        @app.get("/held")
        async def held() -> Response:
            return await ndjson_response(db, "SELECT id FROM held")

        holder: asyncpg.Connection[Any] = await asyncpg.connect(db_url)
        try:
            async with holder.transaction():
                await holder.execute("LOCK TABLE held IN ACCESS EXCLUSIVE MODE")
                async with asgi_client(app) as client:
                    response = await client.get("/held")
        finally:
            await holder.close()
    # The lock bound, as any read's (not 500 for the COMMIT of the aborted transaction).
    assert response.status_code == 503, response.text
    assert response.json()["code"] == "busy"


@asynccontextmanager
async def _large_stream(db_url: str) -> AsyncIterator[tuple[Database, socket.socket]]:
    """A server with a 1 s query deadline, and a `_stalled_client` of it."""
    async with (
        Database(settings_for(db_url, query_timeout=1.0)) as db,
        LiveServer(streaming_app(db, access_log=True), http=PROTOCOL) as server,
    ):
        sock = _stalled_client(server.port)
        try:
            yield db, sock
        finally:
            sock.close()


def _stalled_client(port: int) -> socket.socket:
    """A client that asks for a large stream and then reads nothing, staying connected."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"GET /rows?n=2000000&batch=1000 HTTP/1.1\r\nHost: t\r\n\r\n")
    return sock


async def test_a_client_that_stops_reading_loses_the_stream_and_its_connection(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING")
    caplog.set_level("INFO", logger="pglayer.access")
    async with _large_stream(db_url) as (db, _):
        assert await wait_for(lambda: _async(db.stats().in_use == 1))
        # Once the socket's buffers are full, a chunk waits the query deadline, then the
        # stream is cut short and its connection (and snapshot) let go.
        assert await wait_for(lambda: _async(db.stats().in_use == 0), timeout=20)
    said = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert [m for level, m in said if "stream cut short" in m] != [], said
    assert [m for level, m in said if level == "ERROR"] == [], said
    # Its access line: not a plain 200, which reads as a whole export sent.
    [access] = [r for r in caplog.records if r.name == "pglayer.access"]
    assert access.getMessage().endswith("cut short"), access.getMessage()
    assert getattr(access, "cut_short", False) is True


async def test_a_client_that_reads_slowly_keeps_its_stream(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Cut at the deadline though it read all along: a full socket lets the next chunk in only
    # after its client has taken a large share of the kernel's buffers (megabytes).
    caplog.set_level("WARNING")
    taken = 0
    async with _large_stream(db_url) as (db, sock):
        sock.setblocking(False)
        for _ in range(100):  # 5 s at 40 KB/s, five times the deadline
            await asyncio.sleep(0.05)
            with contextlib.suppress(BlockingIOError):
                taken += len(sock.recv(2000))
        assert db.stats().in_use == 1  # still streaming
    assert taken > 100_000
    assert [r.getMessage() for r in caplog.records if "cut short" in r.getMessage()] == []


async def test_a_head_request_reads_only_the_first_batch(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    # It read and dropped all 200,000 rows of the export (0.5-1.1 s each).
    app = FastAPI()
    setup(app, db)
    failing = "SELECT 1 / (150 - g) AS id FROM generate_series(1, 300) AS g"  # 0 at row 150

    @app.get("/later-fails")
    async def later_fails() -> Response:
        return await ndjson_response(db, failing, batch=100)

    async with asgi_client(app) as client:
        head = await client.head("/later-fails")
        got = await client.get("/later-fails")
    assert (head.status_code, head.headers["content-type"], head.content) == (200, NDJSON, b"")
    assert got.status_code == 200  # cut short at its second batch: the GET reads it
    cut = [r.getMessage() for r in caplog.records if "cut short" in r.getMessage()]
    assert len(cut) == 1, cut  # the GET's, not the HEAD's
    assert db.stats().in_use == 0


async def test_streams_hold_at_most_their_bulkheads_share_of_the_pool(db_url: str) -> None:
    settings = settings_for(db_url, max_size=4, acquire_timeout=0.5, query_timeout=30.0)
    async with Database(settings) as db, LiveServer(streaming_app(db), http=PROTOCOL) as server:
        assert db.settings.bulkhead_caps()["stream"] == 1  # a quarter of 4
        sock = _stalled_client(server.port)
        try:
            assert await wait_for(lambda: _async(db.stats().in_use == 1))
            async with httpx.AsyncClient(base_url=server.url) as client:
                second = await client.get("/rows", params={"n": 10})
            assert second.status_code == 503, second.text
            assert await db.read(lambda conn: conn.fetchval("SELECT 1")) == 1
        finally:
            sock.close()


async def _async(value: bool) -> bool:
    return value


async def test_uuid_interval_and_inet_columns_are_written_as_pydantic_writes_them(
    db: Database,
) -> None:
    app = FastAPI()
    setup(app, db)
    query = (
        "SELECT '6c3a3a3e-8e1f-4b7e-9a55-0d2b9a4c1f10'::uuid AS id,"
        " interval '1 day 2 hours' AS took, inet '10.0.0.1' AS host, cidr '10.0.0.0/8' AS net"
    )

    @app.get("/stream")
    async def stream() -> Response:
        return await ndjson_response(db, query)

    @app.get("/one")
    async def one() -> Response:
        return json_response(await db.read(lambda conn: conn.fetchrow(query)))

    expected = {"id": "6c3a3a3e-8e1f-4b7e-9a55-0d2b9a4c1f10", "took": "P1DT2H",
                "host": "10.0.0.1", "net": "10.0.0.0/8"}  # fmt: skip
    async with asgi_client(app) as client:
        streamed, single = await client.get("/stream"), await client.get("/one")
    assert [orjson.loads(line) for line in streamed.text.splitlines()] == [expected]
    assert single.json() == expected


async def test_a_column_json_cannot_hold_is_a_500_before_the_stream_starts(db: Database) -> None:
    app = FastAPI()
    setup(app, db)

    @app.get("/bytes")
    async def raw_bytes() -> Response:
        return await ndjson_response(db, "SELECT 'x'::bytea AS b")

    async with asgi_client(app) as client:
        response = await client.get("/bytes")
    assert response.status_code == 500  # not a 200 with its body cut short
    assert response.headers["content-type"] == "application/problem+json"
    assert db.stats().in_use == 0
