"""Load generators: wrk with a Lua script when installed, else a built-in asyncio client.

The asyncio client keeps `concurrency` keep-alive connections busy for `duration` seconds
and records each response's status and latency, so it can also split latencies by status
(served vs shed), which wrk cannot.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import orjson

LUA = Path(__file__).with_name("load.wrk.lua")


@dataclass
class LoadResult:
    generator: str
    requests: int
    seconds: float
    non2xx: int
    socket_errors: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    statuses: dict[int, int] = field(default_factory=dict)
    # Only from the asyncio generator: latency of 2xx and of 503 responses separately.
    served_p99_ms: float | None = None
    shed_p99_ms: float | None = None
    shed_with_retry_after: int | None = None
    codes: dict[str, int] = field(default_factory=dict)  # "503 busy": count, non-2xx only
    goodput: float | None = None  # 2xx per second

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def run_wrk(
    url: str, scenario: str, concurrency: int, duration: float, max_id: int, product: int
) -> LoadResult:
    threads = min(2, concurrency)
    env = {
        **os.environ,
        "BENCH_SCENARIO": scenario,
        "BENCH_MAX_ID": str(max_id),
        "BENCH_PRODUCT": str(product),
    }
    out = subprocess.run(
        [
            "wrk", f"-t{threads}", f"-c{concurrency}", f"-d{max(1, round(duration))}s",
            "--timeout", "10s", "-s", str(LUA), url,
        ],
        capture_output=True, text=True, env=env, timeout=duration + 60, check=True,
    ).stdout  # fmt: skip
    match = re.search(r"^WRKJSON (.*)$", out, re.M)
    if match is None:
        raise RuntimeError(f"wrk printed no summary:\n{out}")
    data = orjson.loads(match.group(1))
    return LoadResult(
        generator="wrk",
        requests=data["requests"],
        seconds=data["duration_us"] / 1e6,
        non2xx=data["non2xx"],
        socket_errors=data["connect"] + data["read"] + data["write"] + data["timeout"],
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        max_ms=data["max_us"] / 1000,
    )


def _request(scenario: str, host: str, max_id: int, product: int) -> bytes:
    kind = scenario
    if scenario == "mix":
        r = random.random()
        kind = "orders" if r < 0.2 else "dashboard" if r < 0.6 else "users"
    if kind == "orders":
        body = orjson.dumps(
            {"user_id": random.randint(1, max_id), "product_id": product, "quantity": 1}
        )
        return (
            f"POST /orders HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
    path = "dashboard" if kind == "dashboard" else "users"
    return f"GET /{path}/{random.randint(1, max_id)} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


@dataclass(frozen=True)
class Group:
    """Clients that send the same kind of request: `concurrency` keep-alive connections."""

    name: str
    scenario: str
    concurrency: int


_CODE = re.compile(rb'"code":\s*"([a-z_]+)"')
_LENGTH = re.compile(rb"(?i)\r\ncontent-length: *(\d+)")
_TIMEOUT = 10.0  # seconds a request may take before its connection counts as failed


class _Tally:
    """What one group's clients saw."""

    def __init__(self) -> None:
        self.latencies: dict[int, list[float]] = {}
        self.codes: dict[str, int] = {}
        self.retry_after = 0
        self.socket_errors = 0


class _Client(asyncio.Protocol):
    """One keep-alive connection that sends its next request as soon as an answer is in.

    A protocol, not streams: the generator shares the machine's cores with the servers,
    and callbacks cost it about a third of what `StreamReader` and `wait_for` do.
    """

    def __init__(self, run: _Run, group: Group, tally: _Tally) -> None:
        self.run, self.group, self.tally = run, group, tally
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.started = 0.0  # when the request in flight was sent; 0 when none is
        self.connect()

    def connect(self) -> None:
        if self.run.over():
            self.run.finished(self)
            return
        coro = self.run.loop.create_connection(lambda: self, self.run.host, self.run.port)
        task = self.run.loop.create_task(coro)
        task.add_done_callback(self._connected)

    def _connected(self, task: asyncio.Task[Any]) -> None:
        if task.exception() is not None:
            self.failed()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.send()

    def send(self) -> None:
        assert self.transport is not None
        if self.run.over():
            self.transport.close()
            return
        self.buffer = b""
        self.started = time.perf_counter()
        run = self.run
        self.transport.write(_request(self.group.scenario, run.authority, run.max_id, run.product))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buffer[: end + 4]
        match = _LENGTH.search(head)
        length = int(match.group(1)) if match else 0
        if len(self.buffer) < end + 4 + length:
            return
        self.answered(head, self.buffer[end + 4 : end + 4 + length])

    def answered(self, head: bytes, body: bytes) -> None:
        tally, status = self.tally, int(head[9:12])
        tally.latencies.setdefault(status, []).append(time.perf_counter() - self.started)
        self.started = 0.0
        if status >= 300:
            match = _CODE.search(body)
            code = f"{status} {match.group(1).decode() if match else '-'}"
            tally.codes[code] = tally.codes.get(code, 0) + 1
        lowered = head.lower()
        if status == 503 and b"retry-after" in lowered:
            tally.retry_after += 1
        if b"connection: close" in lowered:
            assert self.transport is not None
            self.transport.close()  # connection_lost connects again
        else:
            self.send()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.started:
            self.failed()
        else:
            self.connect()

    def failed(self) -> None:
        self.tally.socket_errors += 1
        self.started = 0.0
        self.run.loop.call_later(0.01, self.connect)

    def overdue(self, now: float) -> None:
        if self.started and now - self.started > _TIMEOUT and self.transport is not None:
            self.transport.abort()  # connection_lost counts it


class _Run:
    """Clients of every group, until `duration` is over and each has its last answer."""

    def __init__(
        self, host: str, port: int, duration: float, max_id: int, product: int
    ) -> None:  # fmt: skip
        self.loop = asyncio.get_running_loop()
        self.host, self.port, self.authority = host, port, f"{host}:{port}"
        self.max_id, self.product = max_id, product
        self.stop_at = time.perf_counter() + duration
        self.clients: set[_Client] = set()
        self.done = self.loop.create_future()

    def over(self) -> bool:
        return time.perf_counter() >= self.stop_at

    def finished(self, client: _Client) -> None:
        self.clients.discard(client)
        if not self.clients and not self.done.done():
            self.done.set_result(None)

    async def watch(self) -> None:
        while not self.done.done():
            await asyncio.wait([self.done], timeout=1.0)
            now = time.perf_counter()
            for client in list(self.clients):
                client.overdue(now)


async def _run_groups(
    host: str, port: int, groups: list[Group], duration: float, max_id: int, product: int
) -> dict[str, LoadResult]:
    run = _Run(host, port, duration, max_id, product)
    tallies = {g.name: _Tally() for g in groups}
    started = time.perf_counter()
    for group in groups:
        for _ in range(group.concurrency):
            run.clients.add(_Client(run, group, tallies[group.name]))
    await run.watch()
    elapsed = time.perf_counter() - started
    return {
        name: _result(t.latencies, elapsed, t.socket_errors, t.retry_after, t.codes)
        for name, t in tallies.items()
    }


def _result(
    latencies: dict[int, list[float]],
    elapsed: float,
    socket_errors: int,
    retry_after: int,
    codes: dict[str, int],
) -> LoadResult:
    everything = [x for values in latencies.values() for x in values]
    served = [x for status, values in latencies.items() if status < 300 for x in values]
    shed = latencies.get(503, [])
    return LoadResult(
        generator="asyncio",
        requests=len(everything),
        seconds=elapsed,
        non2xx=len(everything) - len(served),
        socket_errors=socket_errors,
        p50_ms=percentile(everything, 0.5) * 1000,
        p99_ms=percentile(everything, 0.99) * 1000,
        max_ms=max(everything, default=0.0) * 1000,
        statuses={status: len(values) for status, values in sorted(latencies.items())},
        served_p99_ms=percentile(served, 0.99) * 1000,
        shed_p99_ms=percentile(shed, 0.99) * 1000 if shed else None,
        shed_with_retry_after=retry_after,
        codes=codes,
        goodput=len(served) / elapsed if elapsed else 0.0,
    )


def _runner() -> Any:
    import uvloop  # uvicorn[standard] brings it

    return uvloop.run


def run_groups(
    url: str, groups: list[Group], duration: float, max_id: int, product: int
) -> dict[str, LoadResult]:
    """Several groups of clients at once, each with its own result."""
    host, port = url.removeprefix("http://").split(":")
    return _runner()(_run_groups(host, int(port), groups, duration, max_id, product))  # type: ignore[no-any-return]


def run_asyncio(
    url: str, scenario: str, concurrency: int, duration: float, max_id: int, product: int
) -> LoadResult:
    """One group of `concurrency` clients, each sending its next request at once."""
    groups = [Group("all", scenario, concurrency)]
    return run_groups(url, groups, duration, max_id, product)["all"]
