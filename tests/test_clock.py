"""The per-loop clock (and the HTTP protocol's idle connections) let go of closed loops."""

from __future__ import annotations

import asyncio
import gc
import weakref

from fastapi import FastAPI

from pglayer._clock import clock
from pglayer._http import PROTOCOL
from tests.conftest import LiveServer


async def _tick_once() -> None:
    clock().wake()
    await asyncio.sleep(0)


def test_a_closed_loop_is_not_kept_by_its_clock() -> None:
    loop = asyncio.new_event_loop()
    loop.run_until_complete(_tick_once())
    loop.close()
    gone = weakref.ref(loop)
    del loop
    asyncio.run(_tick_once())  # a later loop's clock: closed loops are dropped then
    gc.collect()
    assert gone() is None


async def _serve_once() -> None:
    async with LiveServer(FastAPI(), http=PROTOCOL) as server:
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.close()


def test_a_closed_loop_is_not_kept_by_its_idle_connections() -> None:
    loop = asyncio.new_event_loop()
    loop.run_until_complete(_serve_once())
    loop.close()
    gone = weakref.ref(loop)
    del loop
    asyncio.run(_serve_once())
    gc.collect()
    assert gone() is None
