"""uvloop's event loop with a TCP server that accepts a burst of connections in a few turns.

libuv accepts one connection per readiness of the listening socket (libuv/libuv#3696,
2022), so uvloop accepts one connection per turn of the loop. On a server whose turns are
long, because it is busy, a burst of new connections (every client reconnecting after a
deploy, a load balancer opening its pool) waits in the kernel's queue for one turn each:
1,024 clients against one busy worker took 3.8 s to be accepted, and the last of them
waited that long for their first answer while the clients accepted early were served
again and again. asyncio's own loop accepts up to the listen backlog per readiness.

`new_event_loop()` returns a uvloop loop whose TCP servers (what uvicorn asks for: a host
and port with one worker, the socket their parent bound with several) accept, at each
readiness, the connections waiting in the kernel's queue (Linux tells its length), at most
`ACCEPT_BATCH`, opened as uvloop's own transports: the burst above was accepted within
0.6 s and its p99 fell from 4.3 s to 1.2 s. On a socket handed over, which uvicorn's
workers share, each takes its share of the queue (the queue over the workers, at least
two), not all of it: taking 64 a readiness, one of two workers took all 64 of wrk's
connections while the other sat idle. TLS, Unix sockets and options uvicorn does not pass
are left to uvloop. `pglayer serve` runs uvicorn with it; `uvicorn --loop
pglayer._loop:new_event_loop` does the same for any app.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
import sys
from collections.abc import Callable, Iterable
from typing import Any, cast

import uvloop

from pglayer._settings import DatabaseSettings

__all__ = ["ACCEPT_BATCH", "LOOP", "new_event_loop"]

# For `uvicorn.run(loop=...)`: an import string, so worker processes find it too.
LOOP = "pglayer._loop:new_event_loop"
# A bound on the work one readiness adds to a turn (each connection opened costs a task step).
ACCEPT_BATCH = 64
# As asyncio does when accept() fails for want of descriptors or memory: pause, then retry.
PAUSE_AFTER_RESOURCE_ERROR = 1.0
# Only Linux's layout is read (other kernels lay TCP_INFO out otherwise, or lack it).
_TCP_INFO: int | None = getattr(socket, "TCP_INFO", None) if sys.platform == "linux" else None
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
        if ssl is not None or kwargs or not _tcp(host, port, sock):
            uvloops: Any = super()  # its stubs overload host/port and sock apart
            left: asyncio.AbstractServer = await uvloops.create_server(
                protocol_factory, host, port, sock=sock, backlog=backlog, ssl=ssl, **kwargs
            )
            return left
        sockets = [sock] if sock is not None else await self._bind(host, port)
        for listening in sockets:
            listening.listen(backlog)
            listening.setblocking(False)
        # The worker processes sharing a socket handed over, as the connection budget counts them.
        sharers = 1 if sock is None else max(2, DatabaseSettings().worker_count()[0])
        server = _Server(self, sockets, protocol_factory, sharers)
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


def _tcp(host: object, port: int | None, sock: socket.socket | None) -> bool:
    if sock is not None:
        return host is None and port is None and sock.family in (socket.AF_INET, socket.AF_INET6)
    return port is not None and (host is None or isinstance(host, str))  # not a list of hosts


def _queued(listening: socket.socket) -> int | None:
    """How many connections wait in `listening`'s accept queue, where the kernel says:
    Linux's TCP_INFO of a listening socket carries it in `tcpi_unacked`."""
    if _TCP_INFO is None:
        return None
    try:
        info = listening.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 32)
    except OSError:
        return None
    return int(struct.unpack_from("=I", info, 24)[0])


class _Server(asyncio.AbstractServer):
    """Listening sockets; each readiness accepts this process's share of the queue."""

    def __init__(
        self,
        loop: _Loop,
        sockets: Iterable[socket.socket],
        protocol_factory: ProtocolFactory,
        sharers: int = 1,
    ) -> None:
        self._loop = loop
        self._sharers = sharers
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
        for _ in range(self._batch(listening)):
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

    def _batch(self, listening: socket.socket) -> int:
        queued = _queued(listening)
        if queued is None:  # not told: all of a batch if alone, else one, as libuv takes
            return ACCEPT_BATCH if self._sharers == 1 else 1
        return min(ACCEPT_BATCH, max(1, -(-queued // self._sharers)))

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
            transport, protocol = await self._loop.connect_accepted_socket(
                self._protocol_factory, conn
            )
        except OSError:
            conn.close()  # the client left while its transport was being opened
            return
        if self._closed.done():
            # Accepted before the server closed, opened after: the server's shutdown has
            # already told the connections it knew to finish. Told too, this one would
            # otherwise serve a kept-alive client until the shutdown's grace ran out.
            shutdown = getattr(protocol, "shutdown", None)
            if shutdown is not None:
                shutdown()
            else:
                cast(asyncio.BaseTransport, transport).close()


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A uvloop event loop whose TCP servers accept a burst of connections in a few turns."""
    return _Loop()
