"""Refusals written by `pglayer serve`'s HTTP protocol itself while the database is saturated."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pglayer_shop.app import create_app
from pglayer_shop.settings import ShopSettings

from pglayer import Database
from pglayer._context import FRONT_DOOR_KEY
from pglayer._http import PROTOCOL
from pglayer._logs import install_request_id
from pglayer._pool import Pool
from pglayer.fastapi import _middleware
from pglayer.fastapi._middleware import RequestGuard
from tests.conftest import LiveServer, asgi_client, settings_for, wait_for


class Reply:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


class Client:
    """One keep-alive connection, raw bytes in, parsed replies out."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def send(self, *requests: bytes) -> None:
        self.writer.write(b"".join(requests))

    async def reply(self, *, head: bool = False) -> Reply:
        raw = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = dict(line.split(": ", 1) for line in lines[1:] if line)
        length = 0 if head else int(headers.get("content-length", "0"))
        body = await asyncio.wait_for(self.reader.readexactly(length), 10)
        return Reply(status, headers, body)


def get(path: str, *extra: str, method: str = "GET") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: test", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class HeldWithoutWaiters:
    """The app's only connection held, no read queued, the read lane armed at a measured pace
    of one read every 2 s: a read is let in; two in a row would wait 4 s, past the 0.5 s
    acquire deadline."""

    def __init__(self, db: Database) -> None:
        self.db = db
        pool = db._pool
        assert pool is not None
        self.pool: Pool = pool

    async def __aenter__(self) -> HeldWithoutWaiters:
        read = self.pool.lane("read")
        read.hold, read.samples, read.rate = 2.0, read.cap, 0.5
        read.armed_until = time.monotonic() + 60  # as after a missed deadline
        self._held = self.db.connection()
        await self._held.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._held.__aexit__(None, None, None)


class Saturated(HeldWithoutWaiters):
    """`HeldWithoutWaiters` with one read queued: a new read would wait about 4 s."""

    async def __aenter__(self) -> Saturated:
        await super().__aenter__()
        self._waiter = asyncio.create_task(self.pool.acquire(self.pool.lane("read"), timeout=30))
        await wait_for(lambda: asyncio.sleep(0, self.pool.waiting == 1))
        assert self.pool.saturated() is not None
        return self

    async def __aexit__(self, *exc: object) -> None:
        await super().__aexit__(*exc)
        self.pool.release(await self._waiter, 0.0)


@pytest.fixture
async def shop(db_url: str) -> AsyncIterator[tuple[FastAPI, Database, LiveServer]]:
    db = Database(
        settings_for(db_url, min_size=1, max_size=1, acquire_timeout=0.5, refusal_delay=0)
    )
    app = create_app(db=db, settings=ShopSettings(admin_token=None, access_log=True))
    async with app.router.lifespan_context(app), LiveServer(app, http=PROTOCOL) as server:
        yield app, db, server


@pytest.fixture
async def client(shop: tuple[FastAPI, Database, LiveServer]) -> AsyncIterator[Client]:
    reader, writer = await asyncio.open_connection("127.0.0.1", shop[2].port)
    conn = Client(reader, writer)
    conn.send(get("/health/live"))  # the first request builds the app's middleware (the guard)
    assert (await conn.reply()).status == 200
    try:
        yield conn
    finally:
        writer.close()


@pytest.fixture
def guard_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Paths of the requests that reached the request guard (the ASGI app)."""
    calls: list[str] = []
    original = RequestGuard.__call__

    async def counting(self: RequestGuard, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            calls.append(scope["path"])
        await original(self, scope, receive, send)

    monkeypatch.setattr(RequestGuard, "__call__", counting)
    return calls


async def test_a_saturated_app_is_refused_by_the_server_without_reaching_the_app(
    shop: tuple[FastAPI, Database, LiveServer], client: Client, guard_calls: list[str]
) -> None:
    async with Saturated(shop[1]):
        client.send(get("/users/1", "X-Request-ID: mine-1"))
        refused = await client.reply()
    assert refused.status == 503
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.headers["retry-after"] == "4"  # two reads ahead, 2 s each, one connection
    assert refused.headers["x-request-id"] == "mine-1"
    assert b'"code":"overloaded"' in refused.body
    assert int(refused.headers["content-length"]) == len(refused.body)
    assert "date" in refused.headers
    assert "connection" not in refused.headers
    assert guard_calls == []


async def test_the_connection_serves_the_next_request_after_a_refusal(
    shop: tuple[FastAPI, Database, LiveServer], client: Client
) -> None:
    async with Saturated(shop[1]):
        client.send(get("/users/1"))
        assert (await client.reply()).status == 503
    client.send(get("/users/999999"))
    assert (await client.reply()).status == 404  # served by the app, on the same connection


async def test_a_refused_request_body_is_read_and_dropped(
    shop: tuple[FastAPI, Database, LiveServer], client: Client, guard_calls: list[str]
) -> None:
    body = b'{"name": "A", "email": "a@example.com"}' + b" " * 5000
    post = (
        f"POST /users HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    async with Saturated(shop[1]):
        client.send(post, body[:100])
        assert (await client.reply()).status == 503
        client.send(body[100:])  # the rest arrives after the answer, and is dropped
    client.send(get("/users/999999"))
    assert (await client.reply()).status == 404
    assert guard_calls == ["/users/999999"]


async def test_a_refused_head_request_has_no_body(
    shop: tuple[FastAPI, Database, LiveServer], client: Client
) -> None:
    async with Saturated(shop[1]):
        client.send(get("/users/1", method="HEAD"), get("/health/live"))
        head = await client.reply(head=True)
        after = await client.reply()
    assert head.status == 503
    assert int(head.headers["content-length"]) > 0
    assert after.status == 200  # read right after the head: no stray body bytes between


async def test_pipelined_requests_are_answered_in_order(
    shop: tuple[FastAPI, Database, LiveServer], client: Client
) -> None:
    async with Saturated(shop[1]):
        client.send(
            get("/users/1", "X-Request-ID: first"),
            get("/health/live", "X-Request-ID: second"),
            get("/users/2", "X-Request-ID: third"),
        )
        replies = [await client.reply() for _ in range(3)]
    assert [(r.status, r.headers["x-request-id"]) for r in replies] == [
        (503, "first"),
        (200, "second"),
        (503, "third"),
    ]


async def test_health_checks_are_not_refused(
    shop: tuple[FastAPI, Database, LiveServer], client: Client
) -> None:
    async with Saturated(shop[1]):
        client.send(get("/health/live"))
        assert (await client.reply()).status == 200


async def test_a_refusal_with_expect_100_continue_closes_the_connection(
    shop: tuple[FastAPI, Database, LiveServer], client: Client
) -> None:
    async with Saturated(shop[1]):
        client.send(
            b"POST /users HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"Content-Length: 10\r\nExpect: 100-continue\r\n\r\n"
        )
        refused = await client.reply()
        rest = await asyncio.wait_for(client.reader.read(), 10)
    assert refused.status == 503
    assert refused.headers["connection"] == "close"
    assert rest == b""  # closed: the body it never sent cannot be taken for a request


async def test_a_refusal_the_guard_makes_before_routing_is_logged_at_the_door(
    shop: tuple[FastAPI, Database, LiveServer], caplog: pytest.LogCaptureFixture
) -> None:
    # Without the HTTP server's front door (plain uvicorn, an ASGI client) the guard refuses
    # itself: its line said `unmatched`, read as unknown paths.
    app, db, _ = shop
    caplog.set_level("INFO", logger="pglayer.access")
    async with Saturated(db), asgi_client(app) as http:
        response = await http.get("/users/1")
    assert response.status_code == 503
    [line] = [r for r in caplog.records if r.name == "pglayer.access"]
    assert getattr(line, "route", None) == "refused_at_door", line.getMessage()


async def test_refusals_at_the_door_are_counted_and_logged(
    shop: tuple[FastAPI, Database, LiveServer],
    client: Client,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, db, _ = shop
    before = db.stats()
    install_request_id()
    caplog.set_level("INFO", logger="pglayer.access")
    async with Saturated(db):
        client.send(get("/users/1?x=%0d", "X-Request-ID: counted"))
        assert (await client.reply()).status == 503
    after = db.stats()
    assert after.requests_shed == before.requests_shed + 1
    # The read bulkhead's forecast refused it: its refusals say so (they missed every one).
    assert after.bulkheads["read"].refused == before.bulkheads["read"].refused + 1
    client.send(get("/metrics"))
    scraped = (await client.reply()).body.decode()
    assert re.search(
        r'pglayer_http_requests_total\{method="GET",route="refused_at_door",status="503"\} 1\.0',
        scraped,
    )
    line = next(r for r in caplog.records if r.name == "pglayer.access")
    fields = {k: getattr(line, k) for k in ("method", "path", "route", "status", "request_id")}
    assert fields == {
        "method": "GET",
        "path": "/users/1",
        "route": "refused_at_door",
        "status": 503,
        "request_id": "counted",
    }


async def test_a_body_the_server_refuses_midway_is_logged_and_counted_once(
    shop: tuple[FastAPI, Database, LiveServer],
    client: Client,
    caplog: pytest.LogCaptureFixture,
) -> None:
    install_request_id()
    caplog.set_level("INFO", logger="pglayer.access")
    client.send(
        get(
            "/orders",
            "X-Request-ID: midway",
            "Content-Type: application/json",
            "Transfer-Encoding: chunked",
            method="POST",
        )
    )
    await asyncio.sleep(0.2)  # the app has the request and waits for its body
    client.send(b"ZZ\r\n{}\r\n0\r\n\r\n")  # not a chunk size: the server answers 400
    assert (await client.reply()).status == 400
    await asyncio.sleep(0.2)  # the app's side of it ends
    lines = [r for r in caplog.records if r.name == "pglayer.access"]
    said = [(getattr(r, "route", None), getattr(r, "status", None)) for r in lines]
    assert said == [("unmatched", 400)]  # refused before it was routed
    assert lines[0].__dict__["request_id"] == "midway"
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{shop[2].port}") as scraper:
        scraped = (await scraper.get("/metrics")).text
    counted = re.findall(r'pglayer_http_requests_total\{method="POST",[^}]*\} (\S+)', scraped)
    assert counted == ["1.0"], counted


@pytest.mark.parametrize("target", [b"/users/1\x1b[31m", b"/\xff\xfe"])
async def test_a_request_line_the_parser_refuses_is_logged_with_its_target(
    shop: tuple[FastAPI, Database, LiveServer],
    client: Client,
    caplog: pytest.LogCaptureFixture,
    target: bytes,
) -> None:
    # Logged as `"GET "`: the evidence of what was sent was lost.
    caplog.set_level("INFO", logger="pglayer.access")
    client.send(b"GET " + target + b" HTTP/1.1\r\nHost: a\r\n\r\n")
    assert (await client.reply()).status == 400
    await asyncio.sleep(0.1)
    [line] = [r for r in caplog.records if r.name == "pglayer.access"]
    path = line.__dict__["path"]
    assert path.startswith("/"), line.getMessage()
    assert len(path) > 1, line.getMessage()
    assert "\x1b" not in line.getMessage()  # escaped, as every logged path
    assert path.isascii(), path  # `\xff`, not `ÿ`: as Latin-1 it read as a valid path


async def test_of_a_storms_refusals_one_a_second_is_logged_and_the_rest_summed_up(
    shop: tuple[FastAPI, Database, LiveServer],
    client: Client,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, db, _ = shop
    monkeypatch.setattr(_middleware, "REFUSALS_LOGGED_EVERY", 0.3)
    install_request_id()
    caplog.set_level("INFO", logger="pglayer.access")
    async with Saturated(db):
        for n in range(5):
            client.send(get(f"/users/{n}"))
            assert (await client.reply()).status == 503
        await asyncio.sleep(0.5)  # the interval ends: the rest are summed up
    lines = [r for r in caplog.records if r.name == "pglayer.access"]
    assert [getattr(r, "path", None) for r in lines] == ["/users/0", None]
    assert lines[1].getMessage().startswith("4 more requests answered at the door")
    assert lines[1].__dict__["unlogged_refusals"] == 4
    client.send(get("/metrics"))
    scraped = (await client.reply()).body.decode()
    assert re.search(
        r'pglayer_http_requests_total\{method="GET",route="refused_at_door",status="503"\} 5\.0',
        scraped,
    )


@pytest.fixture
async def door(
    shop: tuple[FastAPI, Database, LiveServer], client: Client
) -> AsyncIterator[RequestGuard]:
    """The shop's request guard (built by `client`'s first request), which the server asks
    at the door, with `HeldWithoutWaiters`."""
    guard = getattr(shop[0].state, FRONT_DOOR_KEY)
    assert isinstance(guard, RequestGuard)
    async with HeldWithoutWaiters(shop[1]):
        yield guard


async def test_requests_let_in_whose_tasks_have_not_run_count_as_the_queue_ahead(
    door: RequestGuard,
) -> None:
    # Both parsed in one turn of the loop: the first one's task has not queued it yet.
    first = door.refuse_early(b"GET", b"/users/1", [])
    second = door.refuse_early(b"GET", b"/users/2", [])
    assert first is None
    assert second is not None
    assert b"retry-after: 4\r\n" in second[1]  # the one let in ahead, then itself: 2 s each


async def test_requests_let_in_stop_counting_once_the_loop_turns(door: RequestGuard) -> None:
    assert door.refuse_early(b"GET", b"/users/1", []) is None
    # Its task would run now, and queue in the pool itself (or, answered by the server
    # itself, never reach the guard): either way it no longer counts.
    await asyncio.sleep(0)
    assert door.refuse_early(b"GET", b"/users/2", []) is None


async def test_requests_let_in_are_not_counted_while_admission_does_not_forecast(
    shop: tuple[FastAPI, Database, LiveServer], client: Client
) -> None:
    # Unarmed, the count would change no answer: no callback is queued to reset it.
    guard = getattr(shop[0].state, FRONT_DOOR_KEY)
    assert not shop[1].forecasting()
    assert guard.refuse_early(b"GET", b"/users/1", []) is None
    assert guard._coming == 0
