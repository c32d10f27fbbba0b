"""`RequestGuard`: request ids, a bound on body size, and cancellation when the client leaves."""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import re
import time

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pglayer import context
from pglayer.context import current_request_id
from pglayer.database import Database
from pglayer.deadline import deadline
from pglayer.errors import PoolOverloadedError
from pglayer.fastapi.problems import (
    internal_error_response,
    problem_for_database_error,
    problem_response,
)

__all__ = ["RequestGuard", "StatusNotingSend", "current_request_id", "route_template"]

access_log = logging.getLogger("pglayer.access")
_WATCH_AFTER = 0.02  # seconds
# Generated ids: random per process, then a counter; unique without a syscall per request.
_ID_PREFIX = os.urandom(8).hex()
_id_counter = itertools.count(1)
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def route_template(scope: Scope) -> str:
    """The matched route's template, `unmatched` before routing or for unknown paths."""
    # The template ("/users/{user_id}"), never the raw path: a bounded set of names.
    return getattr(scope.get("route"), "path", None) or "unmatched"


def _too_large(max_body_size: int) -> list[Message]:
    body = orjson.dumps(
        {
            "type": "urn:pglayer:problem:payload_too_large",
            "title": "Payload Too Large",
            "status": 413,
            "detail": f"The request body exceeds {max_body_size} bytes.",
            "code": "payload_too_large",
        }
    )
    return [
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/problem+json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        },
        {"type": "http.response.body", "body": body},
    ]


_RYW_COOKIE = b"pglayer_rw="


def _wrote_recently(scope: Scope) -> bool:
    # The cookie expires by itself (Max-Age): present means "wrote within the window".
    return any(name == b"cookie" and _RYW_COOKIE in value for name, value in scope["headers"])


def _with_write_cookie(send: Send, writes: context.RequestWrites, window: float) -> Send:
    cookie = f"pglayer_rw=1; Max-Age={max(int(window), 1)}; Path=/; HttpOnly; SameSite=Lax"

    async def send_with_cookie(message: Message) -> None:
        # Read-your-writes across requests: after a commit this client reads the primary
        # until replicas have surely caught up.
        if message["type"] == "http.response.start" and writes.wrote:
            headers = [*message.get("headers", []), (b"set-cookie", cookie.encode())]
            message = {**message, "headers": headers}
        await send(message)

    return send_with_cookie


@functools.cache
def _overloaded_response() -> tuple[int, tuple[tuple[bytes, bytes], ...], bytes]:
    # Built once: under a flood this is what most requests get.
    response = problem_response(problem_for_database_error(PoolOverloadedError()))
    headers = tuple(response.headers.raw)
    return response.status_code, headers, bytes(response.body)


class StatusNotingSend:
    """An ASGI `send` that remembers the response status (0 until one is sent)."""

    __slots__ = ("send", "status")

    def __init__(self, send: Send) -> None:
        self.send = send
        self.status = 0

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        await self.send(message)


def _overloaded(request_id: str) -> list[Message]:
    status, headers, body = _overloaded_response()
    return [
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"x-request-id", request_id.encode())],
        },
        {"type": "http.response.body", "body": body},
    ]


class RequestGuard:
    """Pure ASGI middleware around every HTTP request.

    - bounds the request with `request_timeout` (`pglayer.deadline`): acquires, queries
      and retries inside share it;
    - takes `X-Request-ID` (or makes one), exposes it as `request.state.request_id` and
      returns it on the response;
    - reads the whole body first and answers 413 past `max_body_size`, so no handler
      ever holds a pooled connection while a slow client uploads;
    - cancels the handler when the client disconnects before the response is complete,
      which cancels its query and returns its connection to the pool;
    - answers an unexpected exception with a 500 problem that carries only the request id;
    - with `access_log`, logs one line per request on `pglayer.access`, with its request id;
    - with `database`, sheds a request before routing (503 `overloaded`) while that pool
      already has `max_waiters` waiting; `shed_exempt` path prefixes are always served.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_size: int = 1 << 20,
        request_timeout: float | None = 30.0,
        access_log: bool = False,
        database: Database | None = None,
        shed_exempt: tuple[str, ...] = ("/health/", "/metrics"),
    ) -> None:
        self.app = app
        self.database = database
        self.shed_exempt = shed_exempt
        self.max_body_size = max_body_size
        self.request_timeout = request_timeout
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        db = self.database
        if db is not None and db.saturated() and not scope["path"].startswith(self.shed_exempt):
            # Already as many waiting as allowed: answer before routing and validation, so
            # that under a flood shedding costs little and the admitted requests keep the CPU.
            db.count_shed()
            for message in _overloaded(self._request_id(scope)):
                await send(message)
            return
        request_id = self._request_id(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        # Plain set/reset rather than context managers: this runs on every request.
        tokens = context.enter(request_id, lambda: route_template(scope))
        writes_token = None
        if db is not None and db.replicas is not None:
            writes = context.RequestWrites(recent=_wrote_recently(scope))
            writes_token = context.track_writes(writes)
            send = _with_write_cookie(send, writes, db.settings.read_your_writes_window)
        try:
            if not self.access_log:
                await self._handle(scope, receive, send, request_id)
                return
            started = time.perf_counter()
            noting = StatusNotingSend(send)
            try:
                await self._handle(scope, receive, noting, request_id)
            finally:
                status = noting.status
                elapsed_ms = (time.perf_counter() - started) * 1000
                access_log.info(
                    '"%s %s" %s %.1fms',
                    scope["method"],
                    scope["path"],
                    status or "-",
                    elapsed_ms,
                    extra={
                        "method": scope["method"],
                        "path": scope["path"],
                        "route": route_template(scope),
                        "status": status or None,
                        "duration_ms": round(elapsed_ms, 2),
                    },
                )
        finally:
            context.leave(tokens)
            if writes_token is not None:
                context.untrack_writes(writes_token)

    @staticmethod
    def _request_id(scope: Scope) -> str:
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                candidate: str = value.decode("latin-1")
                if _VALID_REQUEST_ID.match(candidate):
                    return candidate
                break
        return f"{_ID_PREFIX}{next(_id_counter):010x}"

    async def _handle(self, scope: Scope, receive: Receive, send: Send, request_id: str) -> None:
        has_body = False
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit():
                if int(value) > self.max_body_size:
                    for message in _too_large(self.max_body_size):
                        await send(message)
                    return
                has_body = value != b"0"
            elif name == b"transfer-encoding":
                has_body = True
        chunks: list[bytes] = []
        size = 0
        while has_body:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_size:
                for out in _too_large(self.max_body_size):
                    await send(out)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)

        task = asyncio.current_task()
        assert task is not None
        disconnected = asyncio.Event()
        completed = False
        cancelled_here = False
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await disconnected.wait()
            return {"type": "http.disconnect"}

        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal completed, started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                completed = True
            await send(message)

        async def watch() -> None:
            nonlocal cancelled_here
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    disconnected.set()
                    if not completed:
                        cancelled_here = True
                        task.cancel()
                    return

        # Most requests finish sooner than _WATCH_AFTER; only slower ones pay for a task that
        # waits for a disconnect. A client that left earlier is noticed when it starts.
        loop = asyncio.get_running_loop()
        watcher: asyncio.Task[None] | None = None

        def start_watching() -> None:
            nonlocal watcher
            watcher = loop.create_task(watch())

        timer = loop.call_later(_WATCH_AFTER, start_watching)
        try:
            with deadline(self.request_timeout):
                await self.app(scope, replay, send_with_id)
        except asyncio.CancelledError:
            # Swallow only our own cancellation; a server shutdown must still propagate.
            if cancelled_here and task.uncancel() == 0:
                return
            raise
        except Exception as exc:
            # Answered here rather than by Starlette's outer ServerErrorMiddleware, so the
            # response carries the request id like every other one.
            if started:
                raise
            response = internal_error_response(
                exc, scope.get("method", ""), scope.get("path", ""), request_id
            )
            await response(scope, replay, send_with_id)
        finally:
            timer.cancel()
            if watcher is not None:
                watcher.cancel()
