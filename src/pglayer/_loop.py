"""uvloop's event loop with a TCP server that accepts a burst of connections in a few turns.

libuv accepts one connection per readiness of the listening socket (libuv/libuv#3696,
2022), so uvloop accepts one connection per turn of the loop. On a server whose turns are
long, because it is busy, a burst of new connections (every client reconnecting after a
deploy, a load balancer opening its pool) waits in the kernel's queue for one turn each:
1,024 clients against one busy worker took 3.8 s to be accepted, and the last of them
waited that long for their first answer while the clients accepted early were served
again and again. asyncio's own loop accepts up to the listen backlog per readiness.

`new_event_loop()` returns a uvloop loop whose `create_server`, for a host and port (what
uvicorn asks for with one worker), binds the sockets itself and accepts up to
`ACCEPT_BATCH` connections per readiness, opened as uvloop's own transports: the burst above
was accepted within 0.6 s and its p99 fell from 4.3 s to 1.2 s. A socket handed over is left
to uvloop, as are TLS and options uvicorn does not pass: uvicorn's workers share the socket
their parent bound, and there one connection a turn is what shares a burst between them
(accepting 64 a readiness, one of two workers took all 64 of wrk's connections while the
other sat idle). `pglayer serve` runs uvicorn with it; `uvicorn --loop
pglayer._loop:new_event_loop` does the same for any app.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable, Iterable
from typing import Any

import uvloop

__all__ = ["ACCEPT_BATCH", "LOOP", "new_event_loop"]

# For `uvicorn.run(loop=...)`: an import string, so worker processes find it too.
LOOP = "pglayer._loop:new_event_loop"
# A bound on the work one readiness adds to a turn (each connection opened costs a task step).
ACCEPT_BATCH = 64
# As asyncio does when accept() fails for want of descriptors or memory: pause, then retry.
PAUSE_AFTER_RESOURCE_ERROR = 1.0
_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

ProtocolFactory = Callable[[], asyncio.BaseProtocol]


class _Loop(uvloop.Loop):
    async def create_server(  # type: ignore[override]
        self,
        protocol_factory: ProtocolFactory,
        host: str | None = None,
        port: int | None = None,
        *,
        sock: socket.socket | None = None,
        backlog: int = 100,
        ssl: Any = None,
        **kwargs: Any,
    ) -> asyncio.AbstractServer:
        if ssl is not None or kwargs or sock is not None or port is None or not _host(host):
            uvloops: Any = super()  # its stubs overload host/port and sock apart
            left: asyncio.AbstractServer = await uvloops.create_server(
                protocol_factory, host, port, sock=sock, backlog=backlog, ssl=ssl, **kwargs
            )
            return left
        sockets = await self._bind(host, port)
        for listening in sockets:
            listening.listen(backlog)
            listening.setblocking(False)
        server = _Server(self, sockets, protocol_factory)
        server.start()
        return server

    async def _bind(self, host: str | None, port: int | None) -> list[socket.socket]:
        """One socket per address `host` resolves to, bound as asyncio binds them."""
        infos = await self.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        sockets: list[socket.socket] = []
        try:
            for family, kind, proto, _, address in dict.fromkeys(infos):
                listening = socket.socket(family, kind, proto)
                sockets.append(listening)
                listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    listening.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    listening.bind(address)
                except OSError as exc:
                    raise OSError(
                        exc.errno,
                        f"error while attempting to bind on address {address!r}: "
                        f"{(exc.strerror or '').lower()}",
                    ) from None
        except BaseException:
            for listening in sockets:
                listening.close()
            raise
        return sockets


def _host(host: object) -> bool:
    return host is None or isinstance(host, str)  # asyncio also takes a list of hosts


class _Server(asyncio.AbstractServer):
    """Listening sockets of this process; each readiness accepts up to `ACCEPT_BATCH`."""

    def __init__(
        self, loop: _Loop, sockets: Iterable[socket.socket], protocol_factory: ProtocolFactory
    ) -> None:
        self._loop = loop
        self._sockets = list(sockets)
        self._protocol_factory = protocol_factory
        self._serving = False
        self._closed = loop.create_future()
        self._opening: set[asyncio.Task[None]] = set()

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self._sockets)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._serving

    def start(self) -> None:
        if self._serving or self._closed.done():
            return
        self._serving = True
        for listening in self._sockets:
            self._loop.add_reader(listening.fileno(), self._accept, listening)

    async def start_serving(self) -> None:
        self.start()

    async def serve_forever(self) -> None:
        self.start()
        await asyncio.shield(self._closed)

    def close(self) -> None:
        """Stop accepting and close the listening sockets; open connections stay open."""
        if self._closed.done():
            return
        for listening in self._sockets:
            if self._serving:
                self._loop.remove_reader(listening.fileno())
            listening.close()
        self._serving = False
        self._closed.set_result(None)

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    def _accept(self, listening: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = listening.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the client left before it was accepted; others may be queued
            except OSError as exc:
                if exc.errno not in _RESOURCE_ERRORS:
                    raise
                self._pause(listening, exc)
                return
            task = self._loop.create_task(self._open(conn))
            self._opening.add(task)
            task.add_done_callback(self._opening.discard)

    def _pause(self, listening: socket.socket, exc: OSError) -> None:
        self._loop.call_exception_handler(
            {"message": "socket.accept() out of system resource", "exception": exc}
        )
        self._loop.remove_reader(listening.fileno())
        self._loop.call_later(PAUSE_AFTER_RESOURCE_ERROR, self._resume, listening)

    def _resume(self, listening: socket.socket) -> None:
        if self._serving:
            self._loop.add_reader(listening.fileno(), self._accept, listening)

    async def _open(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._protocol_factory, conn)
        except OSError:
            conn.close()  # the client left while its transport was being opened


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A uvloop event loop whose TCP servers accept a burst of connections in a few turns."""
    return _Loop()
