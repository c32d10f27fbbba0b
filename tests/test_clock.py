"""The per-loop clock (and the HTTP protocol's idle connections) let go of closed loops."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from fastapi import FastAPI

from pglayer._clock import clock
from pglayer._http import PROTOCOL
from tests.conftest import LiveServer


async def _tick_once() -> None:
    clock().wake()
    await asyncio.sleep(0)


async def _serve_once() -> None:
    async with LiveServer(FastAPI(), http=PROTOCOL) as server:
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.close()


@pytest.mark.parametrize("work", [_tick_once, _serve_once], ids=["clock", "idle-connections"])
def test_a_closed_loop_is_not_kept_by_its_registry(
    work: Callable[[], Coroutine[Any, Any, None]],
) -> None:
    loop = asyncio.new_event_loop()
    loop.run_until_complete(work())
    loop.close()
    gone = weakref.ref(loop)
    del loop
    asyncio.run(work())  # a later loop's entry: closed loops are dropped then
    gc.collect()
    assert gone() is None
