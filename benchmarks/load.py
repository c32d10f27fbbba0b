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
from typing import Any

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


def _percentile(values: list[float], q: float) -> float:
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


async def _run_groups(
    host: str, port: int, groups: list[Group], duration: float, max_id: int, product: int
) -> dict[str, LoadResult]:
    latencies: dict[str, dict[int, list[float]]] = {g.name: {} for g in groups}
    codes: dict[str, dict[str, int]] = {g.name: {} for g in groups}
    retry_after = dict.fromkeys(latencies, 0)
    socket_errors = dict.fromkeys(latencies, 0)
    stop_at = time.perf_counter() + duration

    async def worker(group: Group) -> None:
        mine, reader, writer = latencies[group.name], None, None
        while time.perf_counter() < stop_at:
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(host, port)
                assert reader is not None
                started = time.perf_counter()
                writer.write(_request(group.scenario, f"{host}:{port}", max_id, product))
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                status = int(head[9:12])
                length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))  # type: ignore[union-attr]
                body = await reader.readexactly(length)
                mine.setdefault(status, []).append(time.perf_counter() - started)
                if status >= 300:
                    match = _CODE.search(body)
                    code = f"{status} {match.group(1).decode() if match else '-'}"
                    codes[group.name][code] = codes[group.name].get(code, 0) + 1
                if status == 503 and b"retry-after" in head.lower():
                    retry_after[group.name] += 1
                if b"connection: close" in head.lower():
                    writer.close()
                    writer = None
            except (OSError, asyncio.IncompleteReadError, TimeoutError):
                socket_errors[group.name] += 1
                if writer is not None:
                    writer.close()
                writer = None
                await asyncio.sleep(0.01)
        if writer is not None:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker(g) for g in groups for _ in range(g.concurrency)))
    elapsed = time.perf_counter() - started
    return {
        name: _result(by_status, elapsed, socket_errors[name], retry_after[name], codes[name])
        for name, by_status in latencies.items()
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
        p50_ms=_percentile(everything, 0.5) * 1000,
        p99_ms=_percentile(everything, 0.99) * 1000,
        max_ms=max(everything, default=0.0) * 1000,
        statuses={status: len(values) for status, values in sorted(latencies.items())},
        served_p99_ms=_percentile(served, 0.99) * 1000,
        shed_p99_ms=_percentile(shed, 0.99) * 1000 if shed else None,
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
