"""Connections under `pglayer serve`'s HTTP protocol: kept alive until idle past uvicorn's
`timeout_keep_alive` (without a loop timer per response), pipelined requests bounded and in
order, upgrades refused quietly."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import time
from collections.abc import AsyncIterator

import pytest
import uvloop
from fastapi import FastAPI

from pglayer import _http
from pglayer._http import _MAX_PIPELINED, PROTOCOL, BoundedHttpToolsProtocol
from tests.conftest import LiveServer, wait_for

KEEP_ALIVE = 1  # seconds; idle connections are looked at every quarter of it
SLACK = 3.0  # a loaded two-core machine: how late a close may still come
REQUEST = b"GET /ping HTTP/1.1\r\nHost: test\r\n\r\n"


@pytest.fixture
async def server() -> AsyncIterator[LiveServer]:
    app = FastAPI()

    @app.get("/ping")
    async def ping() -> dict[str, bool]:
        return {"ok": True}

    async with LiveServer(app, http=PROTOCOL, timeout_keep_alive=KEEP_ALIVE) as live:
        yield live


async def ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    writer.write(REQUEST)
    async with asyncio.timeout(SLACK):
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
    return head


async def test_an_idle_connection_is_closed_after_the_keep_alive_timeout(
    server: LiveServer,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        assert (await ask(reader, writer)).startswith(b"HTTP/1.1 200")
        answered = time.monotonic()
        async with asyncio.timeout(KEEP_ALIVE + SLACK):
            assert await reader.read() == b""  # closed by the server
        assert time.monotonic() - answered >= KEEP_ALIVE * 0.9
    finally:
        writer.close()


async def test_a_connection_that_keeps_asking_stays_open(server: LiveServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        for _ in range(4):  # 1.8 s in all, each pause well inside the timeout
            assert (await ask(reader, writer)).startswith(b"HTTP/1.1 200")
            await asyncio.sleep(KEEP_ALIVE * 0.6)
        assert (await ask(reader, writer)).startswith(b"HTTP/1.1 200")
    finally:
        writer.close()


async def test_a_response_arms_no_loop_timer(server: LiveServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        for _ in range(3):
            await ask(reader, writer)
        (protocol,) = server.server.server_state.connections
        assert isinstance(protocol, BoundedHttpToolsProtocol)
        assert protocol.timeout_keep_alive_task is None  # uvicorn's per-response timer
        assert protocol.idle_since > 0
    finally:
        writer.close()


async def test_requests_sent_without_reading_are_queued_up_to_a_bound(
    server: LiveServer,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(b"GET /ping HTTP/1.1\r\nHost: test\r\n\r\n" * 200)
        await asyncio.sleep(0.3)
        replies = []
        async with asyncio.timeout(10):
            while (data := await reader.read(65536)) != b"":
                replies.append(data)
        statuses = b"".join(replies).count(b"HTTP/1.1 200 OK")
        # The one running and those queued behind it are answered; then the server closes.
        assert statuses == 1 + _MAX_PIPELINED
    finally:
        writer.close()


async def test_a_refusal_behind_a_running_request_does_not_write_after_it(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PGLAYER_HEADER_TIMEOUT", "0.3")
    _http._limits.cache_clear()
    try:
        app = FastAPI()

        @app.get("/slow")
        async def slow() -> dict[str, bool]:
            await asyncio.sleep(1.0)
            return {"ok": True}

        async with LiveServer(app, http=PROTOCOL) as live:
            reader, writer = await asyncio.open_connection("127.0.0.1", live.port)
            try:
                # Behind a request still running, one queued and a head that never ends: 408.
                running = b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n"
                writer.write(running * 2 + b"GET /slow HTTP/1.1\r\nHost")
                async with asyncio.timeout(10):
                    answer = await reader.read()  # until the server closes
                await asyncio.sleep(1.2)  # the first request's handler has ended by now
            finally:
                writer.close()
    finally:
        _http._limits.cache_clear()
    assert b" 408 " in answer
    # uvicorn's own log (its handler writes to the process's stderr).
    assert "write_eof" not in capfd.readouterr().err


async def test_a_websocket_upgrade_refused_for_its_head_is_answered_without_a_traceback(
    server: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(  # no Host: refused before uvicorn saw the head it would upgrade
            b"GET /ping HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        async with asyncio.timeout(10):
            answer = await reader.read()
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"application/problem+json" in answer
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # asyncio's


async def test_a_bad_head_behind_a_request_is_answered_after_it(server: LiveServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(REQUEST + b"GET /ping HTTP/1.1\r\n\r\n")  # the second has no Host: 400
        async with asyncio.timeout(10):
            answer = await reader.read()  # until the server closes
    finally:
        writer.close()
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)
    assert statuses == [b"200", b"400"]  # in order: the first request's answer kept


def test_a_client_that_leaves_with_requests_queued_causes_no_traceback(
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    app = FastAPI()

    @app.get("/slow")
    async def slow() -> dict[str, bool]:
        await asyncio.sleep(0.3)
        return {"ok": True}

    async def leave_early() -> None:
        async with LiveServer(app, http=PROTOCOL) as live:
            with socket.create_connection(("127.0.0.1", live.port)) as client:
                client.sendall(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n" * 3)
                await asyncio.sleep(0.1)  # the first is running, two are queued
                client.shutdown(socket.SHUT_WR)  # done sending: the server closes
                await asyncio.sleep(0.6)  # the first has ended meanwhile

    # uvloop, as `pglayer serve` runs: its transports refuse a write once closed.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(leave_early())
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "Exception in ASGI application" not in capfd.readouterr().err


async def test_a_request_that_arrives_as_the_server_shuts_down_gets_a_503_not_a_close() -> None:
    # Under load a signal finds requests sent but not read yet on kept-alive connections:
    # closed on them, the client could not tell whether they were applied.
    app = FastAPI()

    @app.get("/ping")
    async def ping() -> dict[str, bool]:
        return {"ok": True}

    live = LiveServer(app, http=PROTOCOL, timeout_keep_alive=30)
    await live.__aenter__()
    reader, writer = await asyncio.open_connection("127.0.0.1", live.port)
    try:
        assert (await ask(reader, writer)).startswith(b"HTTP/1.1 200")
        live.server.should_exit = True  # as a SIGTERM does
        stopping = asyncio.ensure_future(live.__aexit__())

        async def refused() -> bool:
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", live.port)) != 0

        # Listening ends as connections are told to shut down.
        assert await wait_for(refused, timeout=SLACK, interval=0.005)
        writer.write(REQUEST)
        async with asyncio.timeout(SLACK):
            answer = await reader.read()  # until the server closes
        await stopping
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 503"), answer
    assert b"retry-after: 1\r\n" in answer.lower()
    assert b"connection: close" in answer.lower()
    assert b"shutting down" in answer
