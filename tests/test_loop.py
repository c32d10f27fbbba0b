"""pglayer's event loop: a TCP server that drains a burst of connections in a few turns."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import uvicorn

from pglayer import _loop
from pglayer._serve import event_loop
from tests.conftest import free_port

BURST = 300


class Counting(asyncio.Protocol):
    """Notes the turn of the loop each connection was made in."""

    made: list[int]
    turn: list[int]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made.append(self.turn[0])


def protocol(made: list[int], turn: list[int]) -> Callable[[], Counting]:
    def factory() -> Counting:
        proto = Counting()
        proto.made, proto.turn = made, turn
        return proto

    return factory


def busy_turns(loop: asyncio.AbstractEventLoop, turn: list[int]) -> None:
    """Counts the turns of the loop, each made 2 ms of CPU long, as a busy server's are."""
    turn[0] += 1
    end = time.thread_time() + 0.002
    while time.thread_time() < end:
        pass
    loop.call_soon(busy_turns, loop, turn)


def open_burst(port: int, count: int = BURST) -> list[socket.socket]:
    clients = []
    for _ in range(count):
        client = socket.socket()
        client.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            client.connect(("127.0.0.1", port))
        clients.append(client)
    time.sleep(0.2)  # every handshake done: the burst waits in the kernel's queue
    return clients


def turns_to_accept(new_loop: Callable[[], asyncio.AbstractEventLoop]) -> int:
    """Turns of a busy loop until a burst of connections is all made."""
    made: list[int] = []
    turn = [0]

    async def main() -> int:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(protocol(made, turn), "127.0.0.1", 0, backlog=1024)
        clients = open_burst(server.sockets[0].getsockname()[1])
        try:
            busy_turns(loop, turn)
            deadline = time.monotonic() + 30
            while len(made) < BURST and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0)  # one turn at a time: the turns are what is counted
            assert len(made) == BURST
            return max(made)
        finally:
            server.close()
            for client in clients:
                client.close()

    with asyncio.Runner(loop_factory=new_loop) as runner:
        return runner.run(main())


def test_a_busy_loop_accepts_a_burst_in_a_few_turns() -> None:
    # 64 a turn, then a turn to open each connection's transport and one to make it.
    assert turns_to_accept(_loop.new_event_loop) <= BURST // _loop.ACCEPT_BATCH + 4


def test_plain_uvloop_accepts_one_connection_a_turn_however_busy() -> None:
    """Why the loop exists: if libuv ever accepts a burst again, it can go."""
    import uvloop

    assert turns_to_accept(uvloop.new_event_loop) >= BURST // 2


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    with asyncio.Runner(loop_factory=_loop.new_event_loop) as runner:
        yield runner.get_loop()


async def echo_once(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"ping")
    data = await reader.read(4)
    writer.close()
    return data


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


def test_the_server_serves_until_closed_then_refuses(loop: asyncio.AbstractEventLoop) -> None:
    async def main() -> None:
        server = await loop.create_server(Echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        assert server.is_serving()
        assert await echo_once(port) == b"ping"
        server.close()
        await server.wait_closed()
        assert not server.is_serving()
        with pytest.raises(ConnectionRefusedError):
            await echo_once(port)

    loop.run_until_complete(main())


def readiness_by_hand(
    loop: asyncio.AbstractEventLoop, queued: int, readinesses: int, sharers: int = 1
) -> list[int]:
    """Connections accepted at each of `readinesses` readinesses of a listening socket with
    `queued` connections waiting (the server is not started: its readiness is driven here)."""
    made: list[int] = []
    listening = socket.create_server(("127.0.0.1", 0), backlog=128)
    listening.setblocking(False)
    server = _loop._Server(cast(Any, loop), [listening], protocol(made, [0]), sharers)
    clients = [socket.create_connection(listening.getsockname()) for _ in range(queued)]
    time.sleep(0.1)

    async def readiness() -> int:
        before = len(made)
        server._accept(listening)
        await asyncio.gather(*server._opening)  # each accepted connection opened and made
        return len(made) - before

    async def main() -> list[int]:
        return [await readiness() for _ in range(readinesses)]

    try:
        return loop.run_until_complete(main())
    finally:
        server.close()
        for client in clients:
            client.close()


def test_the_accept_queue_length_is_read_from_the_kernel() -> None:
    listening = socket.create_server(("127.0.0.1", 0), backlog=128)
    clients = [socket.create_connection(listening.getsockname()) for _ in range(7)]
    try:
        time.sleep(0.1)
        assert _loop._queued(listening) == 7
        listening.accept()[0].close()
        assert _loop._queued(listening) == 6
    finally:
        for client in clients:
            client.close()
        listening.close()


def test_a_readiness_accepts_the_queue_up_to_a_batch(loop: asyncio.AbstractEventLoop) -> None:
    assert readiness_by_hand(loop, 100, 3) == [_loop.ACCEPT_BATCH, 100 - _loop.ACCEPT_BATCH, 0]


def test_on_a_shared_socket_a_readiness_takes_its_share_of_the_queue(
    loop: asyncio.AbstractEventLoop,
) -> None:
    assert readiness_by_hand(loop, 40, 7, sharers=2) == [20, 10, 5, 3, 1, 1, 0]


def test_untold_the_queue_a_readiness_takes_a_batch_alone_and_one_when_shared(
    loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_loop, "_TCP_INFO", None)
    assert readiness_by_hand(loop, 70, 2) == [_loop.ACCEPT_BATCH, 70 - _loop.ACCEPT_BATCH]
    assert readiness_by_hand(loop, 3, 2, sharers=2) == [1, 1]


def test_a_socket_handed_over_is_shared_by_the_workers(
    loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """uvicorn's workers share the socket their parent bound: each takes its share."""
    shared = socket.create_server(("127.0.0.1", 0))

    async def main() -> list[int]:
        sharers = []
        for workers in ("3", "1"):
            monkeypatch.setenv("PGLAYER_WORKERS", workers)
            server = await loop.create_server(Echo, sock=shared, backlog=16)
            assert isinstance(server, _loop._Server)
            sharers.append(server._sharers)
            assert await echo_once(shared.getsockname()[1]) == b"ping"
            server._serving = False  # stops reading, keeps the socket for the next round
            loop.remove_reader(shared.fileno())
        return sharers

    try:
        assert loop.run_until_complete(main()) == [3, 2]  # at least two: it was handed over
    finally:
        shared.close()


def test_a_unix_socket_is_left_to_uvloop(loop: asyncio.AbstractEventLoop, tmp_path: Path) -> None:
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(tmp_path / "socket"))
    server = loop.run_until_complete(loop.create_server(Echo, sock=unix))
    assert not isinstance(server, _loop._Server)
    server.close()


def test_a_port_in_use_is_an_os_error_naming_the_address(
    loop: asyncio.AbstractEventLoop,
) -> None:
    taken = socket.create_server(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    try:
        with pytest.raises(OSError, match=f"127.0.0.1', {port}") as raised:
            loop.run_until_complete(loop.create_server(Echo, "127.0.0.1", port))
        assert raised.value.errno == errno.EADDRINUSE
    finally:
        taken.close()


class OutOfDescriptors:
    """A listening socket whose accept() fails as it does when the process has no fds left."""

    def __init__(self, real: socket.socket) -> None:
        self.real = real

    def fileno(self) -> int:
        return self.real.fileno()

    def getsockopt(self, *args: int) -> Any:
        return self.real.getsockopt(*args)

    def accept(self) -> Any:
        raise OSError(errno.EMFILE, "Too many open files")

    def close(self) -> None:
        self.real.close()


def test_out_of_descriptors_pauses_accepting_then_resumes(
    loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_loop, "PAUSE_AFTER_RESOURCE_ERROR", 0.3)
    errors: list[dict[str, Any]] = []
    at: list[float] = []
    resumed = asyncio.Event()

    def handle(_: object, context: dict[str, Any]) -> None:
        errors.append(context)
        at.append(loop.time())
        if len(errors) == 2:
            resumed.set()

    loop.set_exception_handler(handle)
    real = socket.create_server(("127.0.0.1", 0))
    listening: Any = OutOfDescriptors(real)
    client = socket.create_connection(real.getsockname())

    async def main() -> None:
        server = _loop._Server(cast(Any, loop), [listening], Echo)
        server.start()
        await asyncio.sleep(0.05)
        assert len(errors) == 1  # paused: the pending connection is not retried at once
        await asyncio.wait_for(resumed.wait(), 10)
        server.close()

    try:
        loop.run_until_complete(main())
    finally:
        client.close()
    assert errors[0]["exception"].errno == errno.EMFILE
    # Resumed after the pause (uvloop's timers have millisecond steps: 0.3 may read 0.2999...).
    assert at[1] - at[0] >= 0.29


def test_serve_runs_uvicorn_on_this_loop() -> None:
    assert event_loop() == _loop.LOOP
    factory = uvicorn.Config("x:app", loop=event_loop()).get_loop_factory()
    assert factory is _loop.new_event_loop


async def hello(scope: Any, receive: Any, send: Any) -> None:
    """Says hello to the client's address, as uvicorn read it from the transport."""
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": f"hello {scope['client'][0]}".encode()})


def test_uvicorn_serves_on_this_loop() -> None:
    port = free_port()
    config = uvicorn.Config(
        hello, host="127.0.0.1", port=port, loop=event_loop(), lifespan="off",
        log_level="warning",
    )  # fmt: skip
    server = uvicorn.Server(config)

    async def main() -> str:
        task = asyncio.create_task(server.serve())
        while not server.started:  # noqa: ASYNC110  (uvicorn offers no event)
            await asyncio.sleep(0.01)
        assert isinstance(server.servers[0], _loop._Server)
        async with httpx.AsyncClient() as client:
            text = (await client.get(f"http://127.0.0.1:{port}/")).text
        server.should_exit = True
        await task
        return text

    with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
        assert runner.run(main()) == "hello 127.0.0.1"


class Draining(asyncio.Protocol):
    """Notes that the server's shutdown told it to finish (uvicorn's protocols have this)."""

    told: list[bool]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def shutdown(self) -> None:
        self.told.append(True)
        self.transport.close()


def test_a_connection_opened_after_the_server_closed_is_told_to_finish(
    loop: asyncio.AbstractEventLoop,
) -> None:
    told: list[bool] = []

    def factory() -> Draining:
        made = Draining()
        made.told = told
        return made

    listening = socket.create_server(("127.0.0.1", 0), backlog=16)
    listening.setblocking(False)
    server = _loop._Server(cast(Any, loop), [listening], factory, 1)
    client = socket.create_connection(listening.getsockname())
    time.sleep(0.1)

    async def main() -> None:
        server._accept(listening)  # accepted; its transport is being opened...
        server.close()  # ...when the shutdown begins (it tells the connections it knows)
        await asyncio.gather(*server._opening)

    try:
        loop.run_until_complete(main())
    finally:
        client.close()
    assert told == [True]  # else it served a kept-alive client until the grace ran out
