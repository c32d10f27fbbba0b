"""uvicorn's httptools protocol with bounds on how big and how slow a request may be.

uvicorn bounds neither the size of a request's head nor the time its head or body take
to arrive (its keep-alive timeout covers only the idle time between requests, and is
reset by every byte), so one client dripping bytes holds a connection forever. Here:

- a head (request line and headers) over `max_header_size` bytes gets 431;
- a head not complete `header_timeout` seconds after the connection opened, or after its
  first byte on a kept-alive connection, gets 408 (a connection that sent nothing is
  just closed);
- a body not complete `body_timeout` seconds after its head gets 408 (the app sees the
  client leave), or the connection is closed if the response has already started; as does
  one that takes more than four times `max_body_size` on the wire (chunk framing and
  trailers, which the parser does not bound) with 413;
- a request the parser rejects (a bad request line, header or framing) gets 400, as does
  an HTTP/1.1 request without exactly one valid `Host`, a fragment (`#`) in a target, `*`
  outside OPTIONS, or Transfer-Encoding in HTTP/1.0; a method the parser does not know
  (methods are case-sensitive) gets 405 with `Allow` where the path has routes (404 where
  it has none), CONNECT 501, a transfer coding other than `chunked`
  501, an HTTP version other than 1.0 and 1.1 505.

A connection idle between requests is closed after uvicorn's `timeout_keep_alive`, by one
timer for all connections (`_IdleConnections`) rather than uvicorn's timer per response.

Each refusal is a problem document with an `X-Request-ID`, then the connection closes after
a short linger, so the client can read it even while it is still sending. A request that
arrives whole in one read, as almost all do, costs a few comparisons and no timer.

It is also the front door of pglayer's shedding: while the app's database is saturated,
the app's request guard (found on `app.state`) hands over the 503 for a request as soon
as its headers are parsed, and it is written from here after its pause: no task, no
scope, no ASGI call. Under clients that retry at once most requests are refusals, and
what a refusal costs decides how much CPU is left for the requests being served (the
`storm` benchmark). The connection stays open; pipelined requests keep their order.

Pipelined requests queue behind the one running, at most `_MAX_PIPELINED` per connection:
past that, those queued are answered and the connection closes (uvicorn queues without end
what a client sends without reading its answers).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import httptools
import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from pglayer._clock import for_loop
from pglayer._context import FRONT_DOOR_KEY, client_request_id, new_request_id
from pglayer._settings import ServerSettings

__all__ = ["PROTOCOL", "BoundedHttpToolsProtocol"]

# For `uvicorn.run(http=...)`: an import string, so worker processes find it too.
PROTOCOL = "pglayer._http:BoundedHttpToolsProtocol"
_LINGER = 1.0  # seconds a refused connection keeps reading (and dropping) before it closes
_MAX_PIPELINED = 32  # requests queued behind the one running, per connection
_SHUTDOWN_READ = 0.5  # seconds an idle connection is still read once shutdown begins


class _Answered:
    """Stands in for uvicorn's request cycle while a request is refused from here."""

    __slots__ = (
        "disconnected",
        "keep_alive",
        "response_complete",
        "response_started",
        "waiting_for_100_continue",
    )

    def __init__(self, keep_alive: bool) -> None:
        self.keep_alive = keep_alive
        self.disconnected = False
        self.waiting_for_100_continue = False
        self.response_started = False
        self.response_complete = False

    @property
    def message_event(self) -> _Answered:
        return self  # uvicorn sets it when the client leaves; nothing waits on it here

    def set(self) -> None:
        pass


class _IdleConnections:
    """Closes the kept-alive connections of one event loop that stay idle past their
    `timeout_keep_alive`, looking every second (a quarter of the timeout if shorter).

    uvicorn arms a loop timer when a response completes and cancels it when the next
    request arrives: 3-5 µs a request on uvloop for a deadline that almost never fires,
    and a tenth of what a refusal at the front door costs. Here a response only notes
    when it ended; a connection closes up to one look later than its timeout."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._protocols: set[BoundedHttpToolsProtocol] = set()
        self._every = 1.0
        self._handle: asyncio.TimerHandle | None = None

    def add(self, protocol: BoundedHttpToolsProtocol) -> None:
        self._protocols.add(protocol)
        self._every = min(self._every, max(protocol.timeout_keep_alive / 4, 0.01))
        if self._handle is None:
            self._handle = self._loop.call_later(self._every, self._look)

    def discard(self, protocol: BoundedHttpToolsProtocol) -> None:
        self._protocols.discard(protocol)

    def _look(self) -> None:
        now = time.monotonic()
        for protocol in list(self._protocols):
            transport = protocol.transport
            if transport.is_closing() or transport.get_protocol() is not protocol:
                self._protocols.discard(protocol)  # closed, or upgraded to a WebSocket
            elif protocol.idle_since and now - protocol.idle_since >= protocol.timeout_keep_alive:
                protocol.idle_since = 0.0
                protocol.timeout_keep_alive_handler()
        self._handle = self._loop.call_later(self._every, self._look) if self._protocols else None


_idle: dict[asyncio.AbstractEventLoop, _IdleConnections] = {}


def _front_door(app: Any) -> Any:
    """The request guard that offers early refusals for `app`, if any (see the docstring)."""
    for _ in range(4):  # uvicorn's own wrappers (proxy headers) around the app
        state = getattr(app, "state", None)
        if state is not None:
            return getattr(state, FRONT_DOOR_KEY, None)
        app = getattr(app, "app", None)
    return None


@functools.cache
def _limits() -> ServerSettings:
    return ServerSettings()


def _problem(
    status: int, title: str, code: str, detail: str, retry_after: int | None = None
) -> tuple[bytes, bytes]:
    """A problem response's status line and headers (unterminated), and its body."""
    body = orjson.dumps(
        {
            "type": f"urn:pglayer:problem:{code}",
            "title": title,
            "status": status,
            "detail": detail,
            "code": code,
        }
    )
    head = (
        f"HTTP/1.1 {status} {title}\r\n"
        "content-type: application/problem+json\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n"
    )
    if retry_after is not None:
        head += f"retry-after: {retry_after}\r\n"
    return head.encode(), body


_SHUTTING_DOWN = _problem(
    503,
    "Service Unavailable",
    "unavailable",
    "The server is shutting down; send the request again.",
    retry_after=1,
)
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+ ")  # RFC 9110's method token, then SP
_VERSION = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+ [^ \r\n]+ HTTP/([0-9]\.[0-9])\r?\n")
# RFC 3986's host (an IP literal or a registered name; no user, path or space), and a port.
_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]*)(?::([0-9]{1,5}))?")
_UPGRADE = re.compile(rb"\r\nupgrade:([^\r\n]*)(?=\r\n)", re.IGNORECASE)
_TARGET = re.compile(rb"[^ \r\n]*")  # a request line's target, up to its end
_REQUEST_ID = re.compile(rb"\r\n(?i:x-request-id):[ \t]*([^\r\n]*?)[ \t]*(?=\r\n)")


def _without_foreign_upgrade(data: bytes) -> bytes:
    """`data` without an `Upgrade` header to a protocol this server does not speak (h2c,
    TLS): ignored, as RFC 9110 allows, the request is served as HTTP/1.1, body and all. The
    parser would otherwise stop at its head and drop the rest of the read."""
    end = data.find(b"\r\n\r\n") + 2  # the head's last line with its CRLF
    if end < 2:
        return data  # a head spread over reads: left as it is
    head = _UPGRADE.sub(
        lambda m: m.group(0) if b"websocket" in m.group(1).lower() else b"", data[:end]
    )
    return head + data[end:]


_HOSTS_SEEN: dict[bytes, bool] = {}


def _valid_host(value: bytes) -> bool:
    found = _HOST.fullmatch(value)
    valid = found is not None and (found.group(1) is None or int(found.group(1)) <= 65535)
    if len(_HOSTS_SEEN) < 1024:  # bounded: a client inventing hosts only costs the check
        _HOSTS_SEEN[value] = valid
    return valid


_BAD_HEAD = _problem(
    400,
    "Bad Request",
    "validation_error",
    "The request line or headers are not what HTTP/1.1 allows: one valid Host (host[:port]),"
    " no fragment (#) in the target, * only for OPTIONS, no Transfer-Encoding in HTTP/1.0.",
)
_VERSION_NOT_SUPPORTED = _problem(
    505, "HTTP Version Not Supported", "validation_error", "Send HTTP/1.1 (or HTTP/1.0)."
)
_CODING_NOT_IMPLEMENTED = _problem(
    501,
    "Not Implemented",
    "unsupported_media_type",
    "The only transfer coding taken is chunked: send the body as it is, or chunked.",
)
_METHOD_NOT_IMPLEMENTED = _problem(
    501,
    "Not Implemented",
    "method_not_allowed",
    "The method is not one this server knows (methods are case-sensitive: GET, not get).",
)


_NO_ROUTE = _problem(404, "Not Found", "not_found", "No route has this path.")
_PARSED_METHODS = frozenset(
    (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"TRACE", b"CONNECT")
)
_MAX_LOGGED_TARGET = 2048  # bytes of an unknown method's target kept (the log cuts further)


@functools.lru_cache(maxsize=64)
def _method_not_allowed(allow: str) -> tuple[bytes, bytes]:
    head, body = _problem(
        405,
        "Method Not Allowed",
        "method_not_allowed",
        f"The method is not supported here (methods are case-sensitive); this path supports"
        f" {allow}.",
    )
    return head + b"allow: " + allow.encode() + b"\r\n", body


class _AnsweredHere(logging.Filter):
    """Drops uvicorn's own warning for a request this protocol refuses: it answers the
    request itself and logs it as every request is, with its request id. And a request
    uvicorn cancelled when its graceful shutdown ran out is one line, not a traceback of
    "Exception in ASGI application" (the app answered it: pglayer's guard sends a 503)."""

    quieted = ("Invalid HTTP request received.", "Unsupported upgrade request.")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError):
            # uvicorn's own cancel says why; without one, the loop's end cancelled it: a
            # forced quit (a second Ctrl-C), which waits for nothing.
            graceful = "graceful shutdown" in str(record.exc_info[1])
            record.msg = "a request was cancelled: " + (
                "the shutdown's grace ran out" if graceful else "the server quit at once"
            )
            record.args = ()
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            return True
        return record.msg not in self.quieted


@functools.cache
def _quiet_uvicorn() -> None:
    logging.getLogger("uvicorn.error").addFilter(_AnsweredHere())


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """`HttpToolsProtocol` with the bounds of `ServerSettings` (see the module docstring)."""

    _unknown_line: tuple[bytes, bytes] | None = None  # method and target the parser refused
    _stopping = False  # the server shuts down: each request read from now on gets a 503

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _quiet_uvicorn()
        limits = _limits()
        self._max_head = limits.max_header_size
        self._head_timeout = limits.header_timeout
        self._body_timeout = limits.body_timeout
        # Bytes a body may take on the wire, chunk framing and trailers included: trailers
        # are not bounded by the parser, which costs quadratic CPU on a long one (100 MB:
        # 11 s of the event loop).
        self._max_body_read = 4 * limits.max_body_size + limits.max_header_size
        self._body_read = 0
        self._in_head = False  # a request's first byte arrived, its headers have not ended
        self._head_size = 0  # bytes of the reads that began inside the current head
        self._read_size = 0
        self._last_read = b""
        self._body_pending = False
        self._refused = False
        self._skipping = False  # the message being parsed was answered from here
        self._door: Any = None
        self._running: RequestResponseCycle | None = None  # the request the app has now
        self._deferred: Callable[[], None] | None = None  # a refusal written after those
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self.idle_since = 0.0  # when its last response ended, while no byte came since
        self._idle = for_loop(_idle, self.loop, _IdleConnections)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        # Also bounds a connection that never sends a byte.
        self._head_timer = self.loop.call_later(self._head_timeout, self._head_too_slow)
        self._idle.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        self._idle.discard(self)
        self._abandon_queue()
        super().connection_lost(exc)
        self._tell_lost()

    def on_response_complete(self) -> None:
        if self.pipeline or self.transport.is_closing():
            if self.pipeline and not self.transport.is_closing():
                self._running = self.pipeline[-1][0]  # the oldest queued, started next
            super().on_response_complete()
            return
        # uvicorn's, less its keep-alive timer (see `_IdleConnections`).
        self.server_state.total_requests += 1
        self.flow.resume_reading()
        self.idle_since = time.monotonic()
        if self._deferred is not None:
            deferred, self._deferred = self._deferred, None
            deferred()

    def shutdown(self) -> None:
        self._stopping = True
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            # A busy loop may not have read requests already sent on it: read on for a
            # moment and answer each 503 (`_SHUTTING_DOWN`), rather than close on them,
            # which left the client unable to tell whether they were applied.
            self.loop.call_later(_SHUTDOWN_READ, self._close_if_idle)
        else:
            cycle.keep_alive = False

    def _close_if_idle(self) -> None:
        cycle = self.cycle
        if not self._refused and (cycle is None or cycle.response_complete):
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        self.idle_since = 0.0
        if self._refused:
            return  # lingering: read and dropped
        began_in_head = self._in_head
        self._read_size = len(data)
        self._last_read = data
        if began_in_head:
            # A head spread over reads: its size so far, counted before this read is parsed,
            # so that the check where the head ends sees it (a head whose last read is tiny
            # would pass it otherwise). The read it began in is not counted (it may hold the
            # previous request's body); reads are bounded.
            self._head_size += len(data)
        # `find` costs half of `in` here (~0.1 µs a read each, timeit).
        if data.find(b"pgrade") != -1 or data.find(b"PGRADE") != -1:
            data = _without_foreign_upgrade(data)
        super().data_received(data)
        if self._refused or self.transport.is_closing():
            return
        if self._in_head:
            if began_in_head and self._head_size > self._max_head:
                self._refuse_head_too_large()
                return
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(self._head_timeout, self._head_too_slow)
        elif self._body_pending:
            self._body_read += len(data)
            if self._body_read > self._max_body_read:
                self._body_too_large()
            elif self._body_timer is None:
                self._body_timer = self.loop.call_later(self._body_timeout, self._body_too_slow)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_size = 0
        self._body_read = 0
        self._skipping = False

    # After a refusal, the rest of that read is still parsed (url and headers are collected,
    # at most one read's worth), but no request starts.
    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._in_head = False
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        # Only a head that spans reads, or came in a read bigger than the bound, can exceed it.
        if (self._head_size or self._read_size > self._max_head) and self._head_bytes() > (
            self._max_head
        ):
            self._refuse_head_too_large()
            return
        malformed = self._malformed()
        if malformed is not None:
            self._refuse(malformed)
            return
        if self._stopping:
            self._refuse(_SHUTTING_DOWN)
            return
        self._body_pending = True
        door = self._door or _front_door(self.app)
        if door is not None:
            self._door = door
            cycle = self.cycle
            if cycle is None or cycle.response_complete:  # not behind a pipelined request
                early = door.refuse_early(self.parser.get_method(), self.url, self.headers)
                if early is not None:
                    self._answer_early(*early)
                    return
        previous = self.cycle
        super().on_headers_complete()
        cycle = self.cycle  # None after an upgrade
        if cycle is not None:
            # Offers the app's request guard a call when the client leaves (`_tell_lost`).
            cycle.pglayer_lost = None  # type: ignore[attr-defined]
            if previous is None or previous.response_complete:
                self._running = cycle  # else queued behind it, in `pipeline`

    def handle_websocket_upgrade(self) -> None:
        if self._refused:  # a refused head never reached uvicorn's (no scope to upgrade)
            return
        if self.scope["method"] != "GET" or any(
            name == b"transfer-encoding" or (name == b"content-length" and value != b"0")
            for name, value in self.headers
        ):
            # The WebSocket implementation would wait for ever on such a handshake, past the
            # head and body timeouts, which stop at an upgrade (RFC 6455: a GET, no body).
            detail = "A WebSocket handshake is a GET request without a body."
            self._refuse(_problem(400, "Bad Request", "validation_error", detail))
            return
        super().handle_websocket_upgrade()

    def on_body(self, body: bytes) -> None:
        if not (self._refused or self._skipping):
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._body_pending = False
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        if self._skipping:
            self._skipping = False  # its body was read and dropped
            return
        super().on_message_complete()
        if len(self.pipeline) >= _MAX_PIPELINED:
            # A client that sends without reading: uvicorn reads on after every answer and
            # queues what it parses, ~1 KB a request, without end. What is queued is
            # answered, then the connection closes; what follows is read and dropped.
            self.pipeline[0][0].keep_alive = False
            self._refused = True

    def _answer_early(
        self,
        paused: asyncio.Future[None] | None,
        head: bytes,
        body: bytes,
        answered: Callable[[bool], None],
    ) -> None:
        """Answer a refusal from the guard, after its pause; read (and drop) its body."""
        parser = self.parser
        # Unread bytes of a refused upload would be parsed as the next request: close after.
        keep_alive = (
            parser.get_http_version() != "1.0"
            and parser.should_keep_alive()
            and not self.expect_100_continue
        )
        if parser.get_method() == b"HEAD":
            body = b""
        cycle = self.cycle = _Answered(keep_alive)  # type: ignore[assignment]
        self._skipping = True

        def write(_: object = None) -> None:
            transport = self.transport
            if self._refused or cycle.disconnected or transport.is_closing():
                answered(False)
                return
            extra = b"".join(
                name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers
            )
            close = b"" if cycle.keep_alive else b"connection: close\r\n"
            transport.write(b"".join((head, extra, close, b"\r\n", body)))
            cycle.response_started = cycle.response_complete = True
            answered(True)
            if cycle.keep_alive:
                self.on_response_complete()
            else:
                transport.close()

        if paused is None:
            write()
        else:
            paused.add_done_callback(write)

    def _malformed(self) -> tuple[bytes, bytes] | None:
        """The refusal of a head the parser took but HTTP/1.1 does not (RFC 9112), if any."""
        version = self.parser.get_http_version()
        if version != "1.1" and version != "1.0":
            return _VERSION_NOT_SUPPORTED
        hosts, host = 0, b""
        for name, value in self.headers:  # a loop, not a call: every request passes here
            if name == b"host":
                hosts += 1
                host = value
            elif name == b"transfer-encoding" and (
                version == "1.0" or value.strip().lower() != b"chunked"
            ):
                return _BAD_HEAD if version == "1.0" else _CODING_NOT_IMPLEMENTED
        if hosts != 1 and (hosts or version == "1.1"):
            return _BAD_HEAD
        url = self.url
        valid = _HOSTS_SEEN.get(host) if hosts else True  # clients send one Host again and again
        if valid is None:
            valid = _valid_host(host)
        if not valid or b"#" in url:
            return _BAD_HEAD
        if url[:1] != b"/":  # asterisk, absolute or authority form: rare
            return self._unusual_target(url)
        return None

    def _unusual_target(self, url: bytes) -> tuple[bytes, bytes] | None:
        method = self.parser.get_method()
        if method == b"CONNECT":
            return _METHOD_NOT_IMPLEMENTED  # not a proxy: nothing to tunnel to
        if url == b"*":
            return None if method == b"OPTIONS" else _BAD_HEAD
        return None if url.startswith((b"http://", b"https://")) else _BAD_HEAD

    def send_400_response(self, msg: str) -> None:
        # uvicorn answers a request it cannot parse in plain text; every error is a problem.
        # It calls this from its `except` block, so the parser's error is at hand.
        token = _TOKEN.match(self._last_read)  # a method, but not one the parser knows
        if isinstance(sys.exc_info()[1], httptools.HttpParserInvalidMethodError) and token:
            self._refuse(self._unknown_method(token.end()))
            return
        version = _VERSION.match(self._last_read)
        if version is not None and version.group(1) not in (b"1.0", b"1.1"):
            self._refuse(_VERSION_NOT_SUPPORTED)  # a version the parser does not take
            return
        detail = "The request is not valid HTTP/1.1 (request line, headers or framing)."
        self._refuse(_problem(400, "Bad Request", "validation_error", detail))

    def _unknown_method(self, target_at: int) -> tuple[bytes, bytes]:
        """A method the parser does not know is one the path does not support: 405 with the
        methods it does (404 for a path the app has no route for), as the app answers
        any other; 501 where no pglayer app can say."""
        method = self._last_read[: target_at - 1]
        if method in _PARSED_METHODS:
            # A request the parser took came first in this read: the unknown method is in
            # one pipelined behind it, whose target is not at hand here.
            return _METHOD_NOT_IMPLEMENTED
        target = self._last_read[target_at:].split(b" ", 1)[0][:_MAX_LOGGED_TARGET]
        self._unknown_line = (method[:64], target)
        door = self._door or _front_door(self.app)
        allow = door.allowed(target) if door is not None and target[:1] == b"/" else None
        if allow is None:
            return _METHOD_NOT_IMPLEMENTED
        return _method_not_allowed(allow) if allow else _NO_ROUTE

    def _head_bytes(self) -> int:
        return len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self.transport.get_protocol() is not self or self.transport.is_closing():
            return
        if not self._in_head:
            self.transport.close()  # connected and sent nothing
            return
        detail = f"The request headers did not arrive within {self._head_timeout:g} seconds."
        self._refuse(_problem(408, "Request Timeout", "timeout", detail), self._head_timeout)

    def _body_too_slow(self) -> None:
        self._body_timer = None
        if self.transport.get_protocol() is not self or self.transport.is_closing():
            return
        if self.cycle is not None and self.cycle.response_started:
            self._abandon_cycle()
            self.transport.close()
            return
        detail = f"The request body did not arrive within {self._body_timeout:g} seconds."
        self._refuse(_problem(408, "Request Timeout", "timeout", detail), self._body_timeout)

    def _body_too_large(self) -> None:
        if self.cycle is not None and self.cycle.response_started:
            self._abandon_cycle()
            self.transport.close()
            return
        detail = "The request body, its framing and trailers, is too large."
        self._refuse(_problem(413, "Content Too Large", "payload_too_large", detail))

    def _refuse_head_too_large(self) -> None:
        detail = f"The request line and headers exceed {self._max_head} bytes."
        self._refuse(_problem(431, "Request Header Fields Too Large", "payload_too_large", detail))

    def _refuse(self, response: tuple[bytes, bytes], seconds: float = 0.0) -> None:
        """Answer `response` and close; reads in between are dropped, so the client can
        read the answer even while it is still sending (no reset). `seconds`: how long the
        request took, for the log and metrics (a timeout's own; the rest are answered as
        soon as they are read)."""
        if self._refused:
            return  # the parser refusing what follows a head already refused: answered
        self._refused = True
        self._cancel_timers()
        head, body = response
        status = int(head[9:12])  # "HTTP/1.1 431 ..."
        # The client's, from the headers parsed, or else from the read the parser refused
        # (a bad request line, framing): none before the first request.
        headers: list[tuple[bytes, bytes]] = getattr(self, "headers", [])
        request_id = (
            client_request_id(headers)
            or client_request_id((b"x-request-id", v) for v in _REQUEST_ID.findall(self._last_read))
            or new_request_id()
        )
        cycle = self.cycle
        in_app = isinstance(cycle, RequestResponseCycle) and not cycle.response_complete
        if in_app and not cycle.more_body:
            # A new head refused behind requests still being answered: its answer follows
            # theirs, as pipelining's order wants (written from `on_response_complete`).
            self._deferred = lambda: self._write_refusal(
                head, body, request_id, False, status, seconds
            )
            return
        if in_app:
            # The app has the request (its body was still coming): it logs and counts it,
            # with this answer's status and id, once.
            cycle.pglayer_refused = (status, request_id)  # type: ignore[attr-defined]
        self._abandon_cycle()
        self._write_refusal(head, body, request_id, in_app, status, seconds)

    def _write_refusal(
        self, head: bytes, body: bytes, request_id: str, in_app: bool, status: int, seconds: float
    ) -> None:
        extra = b"".join(
            name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers
        )
        id_header = b"x-request-id: " + request_id.encode() + b"\r\n"
        self.transport.write(b"".join((head, id_header, extra, b"\r\n", body)))
        if not in_app:
            self._account(status, request_id, seconds)
        self.flow.resume_reading()
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.loop.call_later(_LINGER, self.transport.close)
        else:
            self.transport.close()

    def _account(self, status: int, request_id: str, seconds: float = 0.0) -> None:
        """Count and log the refusal as the app's own requests are (metrics, access log)."""
        door = self._door or _front_door(self.app)
        if door is None:
            return
        if self._unknown_line is not None:  # a method the parser does not know: its line
            door.account_refused(*self._unknown_line, status, request_id, seconds)
            return
        url: bytes = getattr(self, "url", b"")  # none before the first request began
        token = _TOKEN.match(self._last_read)
        if url:
            method = self.parser.get_method()
        elif token:
            # The parser says DELETE (method 0) for a request line it could not read, and
            # keeps no target: both from the read, or the log had `"GET "` for the evidence.
            method = token[0][:-1][:64]
            target = _TARGET.match(self._last_read, token.end())
            url = target[0][:_MAX_LOGGED_TARGET] if target else b""
        else:
            method = b"-"
        door.account_refused(method, url, status, request_id, seconds)

    def _abandon_cycle(self) -> None:
        # As if the client had left: the app's receive() answers `http.disconnect` and
        # whatever it sends is dropped.
        self._abandon_queue()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True
            cycle.waiting_for_100_continue = False
            cycle.message_event.set()
            self._tell_lost()

    def _abandon_queue(self) -> None:
        # Pipelined requests behind the one running never start, and the one running writes
        # nothing more (uvicorn marks only the newest request when the client leaves: the
        # one running wrote to the closed transport, a traceback each).
        for queued, _ in self.pipeline:
            queued.disconnected = True
        self.pipeline.clear()
        running = self._running
        if running is not None and running is not self.cycle and not running.response_complete:
            running.disconnected = True
            running.message_event.set()
            self._tell_lost(running)

    def _tell_lost(self, cycle: Any = None) -> None:
        # The request guard is told at once that the client left, rather than polling
        # every slow request's flag: under 1,024 clients the polls cost ~10 µs a request.
        cycle = cycle or self.cycle
        lost = getattr(cycle, "pglayer_lost", None)
        if lost is not None and cycle is not None and cycle.disconnected:
            cycle.pglayer_lost = None
            lost()

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = None
