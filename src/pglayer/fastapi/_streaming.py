"""Streaming a large result as NDJSON with bounded memory.

The rows come from a server-side cursor inside a read-only REPEATABLE READ transaction (one
consistent snapshot), `batch` rows at a time, each fetch under the query deadline; each batch
is written to the client before the next is fetched, so memory stays at one batch whatever
the table's size. The connection is taken and the first batch fetched before the response
starts, so a database that is down or overloaded still gets a problem response. When the
client goes away the response is cancelled: the transaction rolls back, the cursor closes
with it, and the connection goes back to the pool; so too when the client stays but stops
reading, once a chunk has waited the query deadline to be taken.
"""

from __future__ import annotations

import asyncio
import struct
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from typing import Any

import orjson
from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from pglayer._database import Database
from pglayer._errors import raise_translated, translate
from pglayer._json import OPTIONS, default
from pglayer.fastapi._problems import EXCHANGE_KEY

if sys.platform == "linux":
    import fcntl
    import termios

    _OUTQ: int | None = termios.TIOCOUTQ  # SIOCOUTQ: bytes in the socket's send queue
else:
    _OUTQ = None

__all__ = ["NDJSON", "StreamAbandoned", "ndjson_response"]

NDJSON = "application/x-ndjson"


def _lines(rows: list[Any]) -> bytes:
    # pglayer's JSON, as every other response writes it: UTC as "Z", Decimals exact.
    return b"".join(orjson.dumps(row, default=default, option=OPTIONS) + b"\n" for row in rows)


class _CursorStream(StreamingResponse):
    """Closes the transaction after the last chunk, or whenever the response ends."""

    def __init__(self, exits: AsyncExitStack, body: AsyncIterator[bytes], timeout: float) -> None:
        super().__init__(body, media_type=NDJSON)
        self._exits = exits
        self._timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        untaken = _untaken(scope)

        async def bounded(message: Message) -> None:
            # A client that stops reading (but stays connected) leaves the write waiting for
            # room in the socket: bounded, or it would hold the connection and its snapshot
            # for as long as it likes. Not by the wait alone: a full socket lets the next
            # chunk in only once its client has taken a share of the kernel's buffers
            # (megabytes), which a slow reader takes longer than the deadline to do.
            while True:
                before = untaken()
                try:
                    async with asyncio.timeout(self._timeout):
                        # The server waits for room before it writes: cut short here, the
                        # chunk was not written, and is sent again.
                        await send(message)
                except TimeoutError:
                    after = untaken()
                    if before is None or after is None or after >= before:
                        raise StreamAbandoned(
                            f"the client took no data for {self._timeout:g}s"
                        ) from None
                else:
                    return

        try:
            if getattr(scope.get(EXCHANGE_KEY), "head", False):
                # HEAD (the app sees a GET): the head alone, not every row read and dropped.
                await send({"type": "http.response.start", "status": self.status_code,
                            "headers": self.raw_headers})  # fmt: skip
                await send({"type": "http.response.body", "body": b""})
            else:
                await super().__call__(scope, receive, bounded)
        except BaseException as exc:
            await _close(self._exits, exc)
            if isinstance(exc, Exception) and not isinstance(exc, StreamAbandoned):
                raise StreamAbandoned(str(exc) or type(exc).__name__) from exc
            raise
        await self._exits.aclose()


def _untaken(scope: Scope) -> Callable[[], int | None]:
    """Bytes written for the client that it has not taken yet (the transport's buffer and,
    on Linux, the socket's send queue), or None where they cannot be read."""
    exchange = scope.get(EXCHANGE_KEY)
    transport = getattr(getattr(exchange, "cycle", None), "transport", None)
    if transport is None:
        return lambda: None
    sock = transport.get_extra_info("socket")
    fd = sock.fileno() if sock is not None else -1
    request = _OUTQ

    def untaken() -> int | None:
        queued: int = transport.get_write_buffer_size()
        if fd >= 0 and request is not None:
            try:
                queued += struct.unpack("i", fcntl.ioctl(fd, request, b"\0\0\0\0"))[0]
            except OSError:  # closed meanwhile
                return None
        return queued

    return untaken


class StreamAbandoned(Exception):
    """A stream that failed after its response started: it cannot be answered any more, only
    cut short (the client sees no final chunk). Its cause says why."""


async def _close(exits: AsyncExitStack, exc: BaseException) -> None:
    """Close `exits` as the error leaves them: the transaction rolls back. (Closed without
    it, the transaction would COMMIT, and a failed one answers 25P02 for the real error.)"""
    await exits.__aexit__(type(exc), exc, exc.__traceback__)


async def ndjson_response(
    db: Database, query: str, *args: Any, batch: int = 500, bulkhead: str = "stream"
) -> StreamingResponse:
    """A response streaming `query`'s rows as NDJSON lines, `batch` rows per chunk.

    It holds a connection while its client reads: `bulkhead` ("stream", by default a quarter
    of the pool) bounds how many do at once, and a client that takes no data for the query
    deadline (`PGLAYER_QUERY_TIMEOUT`) loses the stream and frees the connection."""
    if batch < 1:
        raise ValueError("batch must be at least 1")
    timeout = db.settings.query_timeout
    exits = AsyncExitStack()
    try:
        conn = await exits.enter_async_context(
            db.transaction(readonly=True, isolation="repeatable_read", bulkhead=bulkhead)
        )
    except BaseException:
        await exits.aclose()
        raise
    try:
        cursor = await conn.raw.cursor(query, *args)
        first = await cursor.fetch(batch, timeout=timeout)
    except BaseException as exc:
        error = translate(exc) if isinstance(exc, Exception) else exc
        await _close(exits, exc)
        raise_translated(exc, error)
    try:
        # Written now, so a column JSON cannot hold (bytea) is a 500, not a 200 cut short.
        head = _lines(first)
    except BaseException as exc:
        await _close(exits, exc)
        raise

    async def body() -> AsyncIterator[bytes]:
        if head:
            yield head
        rows = first
        while len(rows) == batch:
            rows = await cursor.fetch(batch, timeout=timeout)
            if rows:
                yield _lines(rows)

    return _CursorStream(exits, body(), timeout)
