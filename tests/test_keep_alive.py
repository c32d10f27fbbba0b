"""Kept-alive connections under `pglayer serve`'s HTTP protocol: closed when idle past
uvicorn's `timeout_keep_alive`, without a loop timer per response."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from fastapi import FastAPI

from pglayer._http import PROTOCOL, BoundedHttpToolsProtocol
from tests.conftest import LiveServer

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
