"""`RequestGuard`: the one ASGI layer around every HTTP request.

It owns what every request needs from pglayer, with one `send` wrapper and one timing:

- a deadline (`request_timeout`) that acquires, queries and retries inside share;
- the request id (`X-Request-ID`, or a new one), returned on the response and on every
  log line of the request;
- the body, read whole first and bounded (`max_body_size`, else 413), so no handler holds
  a pooled connection while a slow client uploads;
- cancellation of the handler when the client disconnects, which cancels its query and
  gives its connection back: under `pglayer serve` the HTTP server calls the guard when a
  client leaves; elsewhere requests that finish within `WATCH_AFTER` never pay for it:
  one clock per process watches only requests still running by then (under uvicorn by
  reading its own disconnect flag every 50 ms; under other servers with a task each);
- `HEAD` wherever `GET` is: the app sees a GET, the client gets its status and headers
  without the body;
- shedding before routing (503 `overloaded`) while `database` is saturated; under
  `pglayer serve` the HTTP server asks first (`refuse_early`), so that a refusal costs no
  task, scope or ASGI call at all;
- a 500 problem carrying only the request id for anything unexpected;
- HTTP metrics (`stats`) and the access log (`access_log`), from the same timing; of the
  refusals at the door, one a second is logged and the rest summed up in one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import re
import time
import urllib.parse
from collections import deque
from collections.abc import Callable
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocketDisconnect

from pglayer import _context as context
from pglayer._clock import Clock, clock, current_task
from pglayer._context import (
    FRONT_DOOR_KEY,
    ID_PREFIX,
    VALID_REQUEST_ID,
    RequestContext,
    client_request_id,
    current_request_id,
    id_counter,
    new_request_id,
    route_path,
)
from pglayer._database import Database
from pglayer._errors import PoolOverloadedError
from pglayer._gc import collect_soon
from pglayer._logs import AccessLog, Throttle, escape, left_out
from pglayer._observability import RequestStats
from pglayer.fastapi._problems import (
    EXCHANGE_KEY,
    Problem,
    allowed_methods,
    client_method,
    frame_refusal,
    internal_error_response,
    problem_for_database_error,
    problem_response,
)
from pglayer.fastapi._streaming import StreamAbandoned

__all__ = ["STATS_KEY", "WATCH_AFTER", "RequestGuard", "current_request_id", "route_template"]

log = logging.getLogger("pglayer.http")

STATS_KEY = "pglayer_request_stats"  # app.state attribute holding the app's RequestStats

WATCH_AFTER = 0.02  # seconds in flight before a request is watched for a disconnect
# Generated ids: random per process, then a counter; unique without a syscall per request.
_RYW_COOKIE = b"pglayer_rw="
_RYW_SET = re.compile(rb"(?:^|;)[ \t]*pglayer_rw=1[ \t]*(?:;|$)")  # a cookie, not in a value
_DISCONNECT: Message = {"type": "http.disconnect"}
_POLL_EVERY = 5  # ticks: slow requests are checked for a disconnect every 50 ms
# Under clients that retry at once most requests are refusals at the door: a line each would
# be thousands a second, written with the CPU the served requests need. The first refusal of
# each such interval is logged as usual, the rest counted and summed up in one line after it.
REFUSALS_LOGGED_EVERY = 1.0  # seconds
_LATE = Throttle()  # errors after a response started


# The route label of a request answered before routing (a refusal at the door while the
# database is saturated): not `unmatched`, which 404s of unknown paths use.
AT_THE_DOOR = "refused_at_door"


def _unwrapped(exc: BaseException) -> BaseException:
    """The error itself, not Starlette's wrapper for a handled one raised too late."""
    if (
        type(exc) is RuntimeError
        and exc.__cause__ is not None
        and str(exc).startswith("Caught handled exception, but response already started")
    ):
        return exc.__cause__
    return exc


def _path(url: bytes) -> str:
    """The path of a request target, decoded as the app would see it."""
    path = url.split(b"?", 1)[0].decode("latin-1")
    return urllib.parse.unquote(path) if "%" in path else path


def _raw_path(url: bytes) -> str:
    """The path of a request target the server refused, its bytes past ASCII escaped."""
    return url.split(b"?", 1)[0].decode("ascii", "backslashreplace")


def route_template(scope: Scope) -> str:
    """The matched route's template, `unmatched` before routing or for unknown paths."""
    # The template ("/users/{user_id}"), never the raw path: a bounded set of names.
    return route_path(scope) or "unmatched"


Reply = tuple[int, tuple[tuple[bytes, bytes], ...], bytes]  # status, headers, body


def _reply(problem: Problem) -> Reply:
    """`problem` rendered once, to be sent as it is by `_Exchange.reply`."""
    response = problem_response(problem)
    return response.status_code, tuple(response.headers.raw), bytes(response.body)


@functools.lru_cache(maxsize=64)
def _overloaded(retry_after: float) -> Reply:
    # Built once per Retry-After (whole seconds): under a flood most requests get this.
    return _reply(problem_for_database_error(PoolOverloadedError(retry_after=retry_after)))


@functools.lru_cache(maxsize=64)
def _overloaded_raw(retry_after: float) -> tuple[bytes, bytes]:
    """`_overloaded` as HTTP/1.1 bytes: status line and header lines, and the body."""
    status, headers, body = _overloaded(retry_after)
    lines = b"".join(name + b": " + value + b"\r\n" for name, value in headers)
    return b"HTTP/1.1 %d Service Unavailable\r\n%s" % (status, lines), body


# What the HTTP server gets from `refuse_early`: the pause to wait out (None: none), the
# response's head lines and body, and what to call once answered (True) or not (False).
EarlyRefusal = tuple[asyncio.Future[None] | None, bytes, bytes, Callable[[bool], None]]


@functools.cache
def _too_large(max_body_size: int) -> Reply:
    body = orjson.dumps(
        {
            "type": "urn:pglayer:problem:payload_too_large",
            "title": "Content Too Large",
            "status": 413,
            "detail": f"The request body exceeds {max_body_size} bytes.",
            "code": "payload_too_large",
        }
    )
    headers = (
        (b"content-type", b"application/problem+json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    )
    return 413, headers, body


# The server stopped waiting for a request (its graceful shutdown ran out): an answer in the
# contract's form, not the server's plain-text 500 and a traceback.
_SHUTTING_DOWN_REPLY = _reply(
    Problem(
        503,
        "unavailable",
        "The server is shutting down; send the request again.",
        headers={"Retry-After": "1", "Connection": "close"},
    )
)


# The server decodes the path before routing: `/admin%2Fusers` would be routed as
# `/admin/users` while a proxy that filters by prefix saw another path.
_ENCODED_SEPARATOR = re.compile(rb"%(?:2[Ff]|5[Cc])")
_ENCODED_SEPARATOR_REPLY = _reply(
    Problem(
        404,
        "not_found",
        "No route has this path: a '/' or '\\' in it is a separator, not to be sent"
        " percent-encoded (%2F, %5C).",
    )
)


def _handshake_answer(message: Message, request_id: str) -> tuple[int, Message]:
    """The status a handshake's answer gives (a close before accepting is a 403), and the
    answer with the request id among its headers."""
    kind = message["type"]
    if kind == "websocket.close":
        return 403, message
    status = 101 if kind == "websocket.accept" else message["status"]
    headers = [*message.get("headers", ()), (b"x-request-id", request_id.encode())]
    return status, {**message, "headers": headers}


# What answers a WebSocket handshake: after it, an error can only close the socket.
_HANDSHAKE_ANSWERS = frozenset(
    ("websocket.accept", "websocket.close", "websocket.http.response.start")
)


class _Exchange:
    """One request as the guard sees it: replayed body, noted status, disconnect watch."""

    # Defaults live on the class: a request sets only what differs (cheaper than slots).
    body = b""
    length = -1  # Content-Length, -1 without one
    chunked = False
    wrote_recently = False
    head = False
    delivered = False
    status = 0
    completed = False
    done = False
    stopped_by_us = False
    told = False  # the HTTP server calls `_left` when the client leaves (`pglayer._http`)
    gone: asyncio.Future[None] | None = None
    task: asyncio.Task[Any] | None = None
    watcher: asyncio.Task[None] | None = None
    writes: context.Writes | None = None
    ctx: RequestContext | None = None
    answered: BaseException | None = None  # what the app's handler for `Exception` answered
    ended = 0.0  # when the response's last byte was sent (0: not yet)
    cut_short = False  # a streamed response ended without its final chunk
    at_door = False  # refused for the pool's saturation before routing
    cookie = b""
    cycle: Any = None

    def __init__(self, scope: Scope, receive: Receive, send: Send, started: float) -> None:
        self.receive_from_client = receive
        self.send_to_client = send
        self.started = started
        # uvicorn's request cycle flags a vanished client itself: reading that flag from the
        # clock's tick costs far less than a task per slow request waiting on receive().
        cycle = getattr(receive, "__self__", None)
        self.cycle = cycle if isinstance(getattr(cycle, "disconnected", None), bool) else None
        # One pass over the headers for everything the guard reads from them.
        request_id = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                if request_id is None and VALID_REQUEST_ID.fullmatch(value):
                    request_id = value
            elif name == b"content-length":
                # 19 digits are already past any bound; int() refuses 4,300+ digits.
                self.length = int(value[:19]) if value.isdigit() else -1
            elif name == b"transfer-encoding":
                self.chunked = True
            elif name == b"cookie" and _RYW_COOKIE in value and _RYW_SET.search(value):
                # Expires by itself (Max-Age): present means "wrote within the window".
                self.wrote_recently = True
        if request_id is None:
            # `new_request_id()` spelled out: every request passes here.
            self.request_id = f"{ID_PREFIX}{next(id_counter):010x}"
            self.id_header = (b"x-request-id", self.request_id.encode())
        else:
            self.request_id = request_id.decode("ascii")
            self.id_header = (b"x-request-id", request_id)

    async def receive(self) -> Message:
        if not self.delivered:
            self.delivered = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        # The app waits for the client to leave (a streaming response): watch from now on.
        self.watch()
        if self.gone is None:
            self.gone = asyncio.get_running_loop().create_future()
        await asyncio.shield(self.gone)
        return _DISCONNECT

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            headers = [*message.get("headers", ()), self.id_header]
            writes = self.writes
            if writes is not None and writes.wrote:
                headers.append((b"set-cookie", self.cookie))
            message = {**message, "headers": headers}
        elif message["type"] == "http.response.body":
            if not message.get("more_body", False):
                self.completed = True
                # What runs after the response (background tasks) is not the request: it
                # is not timed with it, nor bound by its deadline (each statement still is).
                self.ended = time.monotonic()
                if self.ctx is not None:
                    self.ctx.deadline = None
            if self.head:
                message = {**message, "body": b""}
        await self.send_to_client(message)

    async def reply(self, answer: Reply) -> None:
        status, headers, body = answer
        await self.send({"type": "http.response.start", "status": status, "headers": headers})
        await self.send({"type": "http.response.body", "body": body})

    def watch(self) -> None:
        """Start noticing a disconnect (once); the handler is cancelled if it comes first."""
        if self.watcher is None and not self.done and not self.told:
            self.watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            message = await self.receive_from_client()
            if message["type"] == "http.disconnect":
                break
        self._left()

    def still_here(self) -> bool:
        """Polled: False once the request is over or its client has gone (then stopped)."""
        if self.done:
            return False
        if self.cycle.disconnected:
            self._left()
            return False
        return True

    def _left(self) -> None:
        if self.gone is not None and not self.gone.done():
            self.gone.set_result(None)
        if not self.completed and not self.done and self.task is not None:
            self.stopped_by_us = True
            self.task.cancel()

    def finish(self) -> None:
        self.done = True
        self.answered = None  # its traceback holds the frame that holds this exchange
        if self.told:
            self.cycle.pglayer_lost = None  # it refers to this exchange: a cycle otherwise
        # The task holds this exchange through its frames: break the cycle, so the
        # request's objects are freed now rather than by the cyclic garbage collector.
        self.task = None
        if self.watcher is not None:
            self.watcher.cancel()
            self.watcher = None


class RequestGuard:
    """Pure ASGI middleware: deadline, request id, body bound, disconnects, shedding,
    500s, HTTP metrics and the access log (see the module docstring)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_size: int = 1 << 20,
        request_timeout: float | None = 30.0,
        access_log: bool = False,
        database: Database | None = None,
        shed_exempt: tuple[str, ...] = (),
        stats: RequestStats | None = None,
        app_state: Any = None,
        router: Any = None,
    ) -> None:
        self.app = app
        self.router = router  # the app's, for what `allowed` answers
        self.database = database
        self.shed_exempt = shed_exempt
        self._exempt = tuple(path.encode() for path in shed_exempt)
        self.max_body_size = max_body_size
        self.request_timeout = request_timeout
        # HTTP metrics: given here, or found on the app once (see `setup_metrics`).
        self.stats = stats
        self._stats_known = stats is not None
        self._app_state = app_state
        self.access_log = AccessLog() if access_log else None
        self._pending: deque[_Exchange] = deque()  # in arrival order, not yet watched
        self._polled: list[_Exchange] = []  # watched by looking at the server's flag
        self._ticks = 0
        self._clock: Clock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Requests the front door let in during this turn of the loop: the server parses
        # every connection that has data before any task runs, so the pool's line does not
        # show them yet. Without them a burst passed the door whole and was refused here
        # instead, with a task, a scope and an ASGI call each. Reset by a callback queued
        # before their tasks (not counted down per request: a request whose task never
        # reaches this guard, such as uvicorn's own 503 past `limit_concurrency`, would
        # be counted for ever).
        self._coming = 0
        self._refusals_quiet_until = 0.0  # monotonic time until which refusals are counted
        self._refusals_unlogged = 0
        if app_state is not None and database is not None:
            setattr(app_state, FRONT_DOOR_KEY, self)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or EXCHANGE_KEY in scope:
            # Not HTTP, or a mounted app's guard under its outer app's: that one does it all.
            if scope["type"] == "websocket":
                await self._websocket(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        ex = _Exchange(scope, receive, send, time.monotonic())
        if scope["method"] == "HEAD":
            # A copy: the server keeps seeing HEAD (uvicorn then expects no body).
            scope = {**scope, "method": "GET"}
            ex.head = True
        raw_path = scope.get("raw_path")
        if raw_path is not None and b"%" in raw_path and _ENCODED_SEPARATOR.search(raw_path):
            try:
                await ex.reply(_ENCODED_SEPARATOR_REPLY)
            finally:
                self._account(scope, ex)
            return
        try:
            db = self.database
            predicted = None if db is None else db.saturated()
            if predicted is not None and not scope["path"].startswith(self.shed_exempt):
                # Even a read would wait past its deadline: refused before routing and
                # validation, so refusing costs little and admitted requests keep the CPU.
                assert db is not None
                db.count_shed()
                ex.at_door = True
                timeout = self.request_timeout
                await db.pause_refusal(predicted, None if timeout is None else ex.started + timeout)
                await ex.reply(_overloaded(float(math.ceil(predicted))))
                return
            if (ex.length > 0 or ex.chunked) and not await self._read_body(ex):
                return
            token = context.enter(self._begin(scope, ex))
            try:
                await self.app(scope, ex.receive, ex.send)
            except asyncio.CancelledError:
                # Swallow only our own cancellation; a server shutdown must still propagate.
                if ex.stopped_by_us and ex.task is not None and ex.task.uncancel() == 0:
                    return
                raise
            except Exception as exc:
                if ex.answered is exc:
                    return  # with its 500 (and logged), by the app's handler for `Exception`
                if ex.status:
                    self._after_start(scope, ex, exc)
                    return
                response = internal_error_response(
                    exc, client_method(scope), scope.get("path", ""), ex.request_id
                )
                await response(scope, ex.receive, ex.send)
            finally:
                ex.finish()
                context.leave(token)
        except asyncio.CancelledError:
            if ex.status and not ex.completed and not ex.stopped_by_us:
                ex.cut_short = True  # by the server's shutdown, midway: said on its access line
            if ex.stopped_by_us or ex.status:
                raise
            # Cancelled by the server (its shutdown's grace ran out) before an answer.
            await ex.reply(_SHUTTING_DOWN_REPLY)
            raise
        finally:
            scope.pop(EXCHANGE_KEY, None)  # a cycle otherwise, through uvicorn's request cycle
            self._account(scope, ex)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A WebSocket with a request id (its logs', its handshake's answer's) and an access
        line when it ends: `WS`, the handshake's status (101 accepted), its whole life.

        A WebSocket's error that no handler took: said once, the socket closed with 1011
        (uvicorn would log a traceback and drop the connection: 1006 to the client), or,
        before the handshake was answered, a 500 problem where the server can send one
        (uvicorn answers a close then with a bare 403)."""
        started = time.monotonic()
        request_id = client_request_id(scope["headers"]) or new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        status = 0

        async def send_noted(message: Message) -> None:
            nonlocal status
            if not status and message["type"] in _HANDSHAKE_ANSWERS:
                status, message = _handshake_answer(message, request_id)
            await send(message)

        token = context.enter(RequestContext(request_id, None, None, scope))
        try:
            await self.app(scope, receive, send_noted)
        except WebSocketDisconnect:
            pass  # the client left: not an error of the app's
        except Exception as exc:
            refused = frame_refusal(exc) if status else None
            if refused is not None:  # the client's doing: closed saying so, not an error
                code, reason = refused
                with contextlib.suppress(Exception):  # the client left meanwhile
                    await send({"type": "websocket.close", "code": code, "reason": reason})
                return
            answered = bool(status)
            status = status or 500
            count = _LATE.allow((type(exc), "websocket"))
            if count is not None:
                log.exception(
                    "websocket %s -> closed, 500 internal (%s)%s",
                    escape(scope.get("path", "")),
                    type(exc).__name__,
                    left_out(count),
                )
            with contextlib.suppress(Exception):  # closed already, or the client left
                if not answered and "websocket.http.response" in scope.get("extensions", {}):
                    await problem_response(Problem(500, "internal"))(scope, receive, send)
                else:
                    await send({"type": "websocket.close", "code": 1011, "reason": "internal"})
        finally:
            context.leave(token)
            collect_soon()
            if self.access_log is not None:
                seconds = time.monotonic() - started
                route = route_template(scope)
                # Never answered: the server refuses the handshake itself, with a 403.
                self.access_log.write(
                    "WS", scope["path"], route, status or 403, seconds, request_id
                )

    @staticmethod
    def _after_start(scope: Scope, ex: _Exchange, exc: Exception) -> None:
        """An error once the response had started, said here once (the app's handler for
        `Exception` leaves it to us, and uvicorn would log it again): a response still being
        sent is cut short, the connection closed without its final chunk, so the client
        knows it is incomplete; after a complete response it came from background work."""
        cause = _unwrapped(exc)
        where = f"{escape(client_method(scope))} {escape(scope.get('path', ''))}"
        if isinstance(cause, StreamAbandoned):
            ex.cut_short = True
            # Complete here only when a middleware (Starlette's BaseHTTPMiddleware) ended
            # the response itself: the client cannot tell it was cut short.
            late = " after a middleware completed its response" if ex.completed else ""
            log.warning(
                "%s: stream cut short%s (request_id=%s): %s",
                where,
                late,
                ex.request_id,
                escape(str(cause)),
            )
        else:
            # Once a second per kind: unlike a 500, no client holds this line's request id,
            # and under an outage every request's background work fails alike.
            count = _LATE.allow((type(cause), ex.completed))
            if count is not None:
                log.error(
                    "%s: %s %s (request_id=%s)%s",
                    where,
                    type(cause).__name__,
                    "after its response was complete (background work, or a stream a"
                    " middleware completed)"
                    if ex.completed
                    else "while the response was being sent: cut short",
                    ex.request_id,
                    left_out(count),
                    exc_info=cause,
                )
        if ex.completed:
            return
        if ex.cycle is None:
            raise exc  # another server: it must learn that the response is incomplete
        ex.cycle.disconnected = True  # uvicorn then takes the unfinished response as meant
        ex.cycle.transport.close()

    def refuse_early(
        self, method: bytes, url: bytes, headers: list[tuple[bytes, bytes]]
    ) -> EarlyRefusal | None:
        """For the HTTP server: while the database is saturated, the refusal it should
        write itself for this request (before any ASGI work); else None."""
        db = self.database
        if db is None or not url.startswith(b"/") or url.startswith(self._exempt):
            return None
        predicted = db.saturated(self._coming)
        if predicted is None:
            # Counted only while admission forecasts: otherwise the count changes nothing,
            # and a callback per turn is a callback per request when requests come singly.
            if self._coming or db.forecasting():
                if not self._coming:
                    asyncio.get_running_loop().call_soon(self._turned)
                self._coming += 1
            return None
        db.count_shed()
        started = time.monotonic()
        request_id = client_request_id(headers) or new_request_id()
        head, body = _overloaded_raw(float(math.ceil(predicted)))
        timeout = self.request_timeout
        paused = db.pace_refusal(predicted, None if timeout is None else started + timeout)

        def answered(sent: bool) -> None:
            self._account_early(method, url, 503 if sent else 499, started, request_id)

        head += b"x-request-id: " + request_id.encode() + b"\r\n"
        return paused, head, body, answered

    def allowed(self, url: bytes) -> str | None:
        """For the HTTP server: the `Allow` of a request target's path (empty: no route
        has it; None: unknown, without the app's router)."""
        if self.router is None:
            return None
        return allowed_methods(
            {"type": "http", "method": "GET", "path": _path(url), "root_path": "",
             "router": self.router, "headers": []}
        )  # fmt: skip

    def _turned(self) -> None:
        self._coming = 0  # their tasks run next, in order, and queue in the pool

    def _account_early(
        self, method: bytes, url: bytes, status: int, started: float, request_id: str
    ) -> None:
        if not self._stats_known:
            self._find_stats(None)
        seconds = time.monotonic() - started
        verb = method.decode("latin-1")
        if self.stats is not None:
            self.stats.record(verb, AT_THE_DOOR, status, seconds)
        if self.access_log is None:
            return
        if started < self._refusals_quiet_until:
            self._refusals_unlogged += 1
            return
        self.access_log.write(verb, _path(url), AT_THE_DOOR, status, seconds, request_id)
        self._refusals_quiet_until = started + REFUSALS_LOGGED_EVERY
        asyncio.get_running_loop().call_later(REFUSALS_LOGGED_EVERY, self._sum_up_refusals)

    def account_refused(
        self, method: bytes, url: bytes, status: int, request_id: str, seconds: float = 0.0
    ) -> None:
        """For the HTTP server: count and log a request it answered itself (400, 408, 431,
        501, 505), as every other request is."""
        if not self._stats_known:
            self._find_stats(None)
        verb = method.decode("latin-1")
        if self.stats is not None:
            self.stats.record(verb, "unmatched", status, seconds)
        if self.access_log is not None:
            # Bytes past ASCII as `\xe9`: decoded as Latin-1 they read as a valid path (`é`).
            path = _path(url) if url.isascii() else _raw_path(url)
            self.access_log.write(verb, path, "unmatched", status, seconds, request_id)

    def _sum_up_refusals(self) -> None:
        unlogged, self._refusals_unlogged = self._refusals_unlogged, 0
        if unlogged and self.access_log is not None:
            self.access_log.logger.info(
                "%d more requests answered at the door (503 overloaded, or 499 if the client"
                " left during the pause) in %gs, not logged one by one",
                unlogged,
                REFUSALS_LOGGED_EVERY,
                extra={"unlogged_refusals": unlogged},
            )

    async def _read_body(self, ex: _Exchange) -> bool:
        """Read the whole body into `ex`; False if the request was answered (413) or gone."""
        if ex.length > self.max_body_size:
            await ex.reply(_too_large(self.max_body_size))
            return False
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await ex.receive_from_client()
            if message["type"] == "http.disconnect":
                ex.stopped_by_us = True  # the client left (or the server timed the body out)
                return False
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_size:
                await ex.reply(_too_large(self.max_body_size))
                return False
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        ex.body = b"".join(chunks)
        return True

    def _begin(self, scope: Scope, ex: _Exchange) -> RequestContext:
        """The request's context; and from now on, its disconnect may cancel it."""
        scope.setdefault("state", {})["request_id"] = ex.request_id
        scope[EXCHANGE_KEY] = ex
        timeout = self.request_timeout
        ctx = ex.ctx = RequestContext(
            ex.request_id, None if timeout is None else ex.started + timeout, None, scope
        )
        db = self.database
        if db is not None and db.replicas is not None:
            ctx.writes = ex.writes = context.Writes(recent=ex.wrote_recently)
            # Read-your-writes across requests: after a commit this client reads the
            # primary until replicas have surely caught up.
            https = scope.get("scheme") == "https"  # as the proxy headers say, where trusted
            ex.cookie = db.replicas.secure_cookie if https else db.replicas.cookie
        ex.task = current_task()
        cycle = ex.cycle
        if cycle is not None and getattr(cycle, "pglayer_lost", 0) is None:
            cycle.pglayer_lost = ex._left
            ex.told = True
            if cycle.disconnected:
                ex._left()  # gone before the hook was set
            return ctx
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop = loop
            self._clock = clock()
            self._clock.subscribe(self._tick)
            self._pending.clear()
        self._pending.append(ex)
        assert self._clock is not None
        self._clock.wake()
        return ctx

    def _tick(self, now: float) -> bool:
        pending = self._pending
        cutoff = now - WATCH_AFTER
        while pending and pending[0].started <= cutoff:
            ex = pending.popleft()
            if ex.done:
                continue
            if ex.cycle is not None:
                self._polled.append(ex)
            else:
                ex.watch()
        self._ticks += 1
        if self._polled and self._ticks % _POLL_EVERY == 0:
            self._polled = [ex for ex in self._polled if ex.still_here()]
        return bool(pending or self._polled)

    def _find_stats(self, scope_state: Any) -> None:
        """Once: the HTTP metrics of the app (given, or found on its state)."""
        self._stats_known = True
        self.stats = getattr(self._app_state or scope_state, STATS_KEY, None)

    def _account(self, scope: Scope, ex: _Exchange) -> None:
        if not self._stats_known:
            self._find_stats(getattr(scope.get("app"), "state", None))
        stats, access_log = self.stats, self.access_log
        if stats is None and access_log is None:
            return
        seconds = (ex.ended or time.monotonic()) - ex.started
        route = AT_THE_DOOR if ex.at_door else route_template(scope)
        method = "HEAD" if ex.head else scope["method"]
        status, request_id = ex.status, ex.request_id
        if not status:
            # Nothing sent: the HTTP server answered it (a body too slow or malformed: its
            # status and the request id it sent), the client left first (499, as nginx logs
            # it), or the app raised past us and the server answers 500.
            refused = getattr(ex.cycle, "pglayer_refused", None)
            if refused is not None:
                status, request_id = refused
            elif ex.stopped_by_us:
                status = 499
        if stats is not None:
            stats.record(method, route, status or 500, seconds)
        if access_log is not None:
            access_log.write(
                method, scope["path"], route, status, seconds, request_id, ex.cut_short
            )
