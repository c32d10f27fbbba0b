"""CPU µs and Python calls per request, in process: the ASGI apps driven without a socket.

    python -m benchmarks.hotpath [--requests 3000] [--routes users,dashboard,orders]

Each app runs its lifespan on uvloop and answers requests one at a time through a
hand-built ASGI scope, so what is measured is the app's own Python path (framework,
pglayer, driver) and none of the HTTP server's. PostgreSQL runs in its own processes and
is not counted. Apps: the shop (as `serve` runs it: metrics and access log on, the log
written to /dev/null), the shop with both off, the naive baseline, the bare FastAPI route
(`bare.py`, the ceiling) and bare Starlette (`floor.py`).

All apps of a route run in one process, measured in interleaved rounds of `--requests`
requests (shuffled order each round, so drift and noise hit them alike); CPU is
`time.process_time()` per request, the least of the rounds, with `--concurrency` requests
in flight (fewer than the pool's connections, so nothing waits for one); calls are
cProfile's count (Python functions and C calls) over a tenth of them. `--by-package`
also splits the CPU of each app by the package whose code ran (cProfile's own time).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import importlib
import logging
import os
import pstats
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import uvloop

ROOT = Path(__file__).resolve().parent.parent

# app name -> (import target, environment); the shop is built per run from the environment.
APPS: dict[str, tuple[str, dict[str, str]]] = {
    "shop": (
        "pglayer_shop.app:create_app",
        {"PGLAYER_METRICS": "true", "PGLAYER_ACCESS_LOG": "true", "PGLAYER_LOG_FORMAT": "text"},
    ),
    "shop-quiet": (
        "pglayer_shop.app:create_app",
        {"PGLAYER_METRICS": "false", "PGLAYER_ACCESS_LOG": "false"},
    ),
    "baseline": ("benchmarks.baselines.naive:app", {}),
    "bare": ("benchmarks.bare:app", {}),
    "floor": ("benchmarks.floor:app", {}),
}
ROUTES = {
    "users": ("shop", "shop-quiet", "baseline", "bare", "floor"),
    "dashboard": ("shop", "shop-quiet", "baseline", "bare", "floor"),
    "orders": ("shop", "shop-quiet", "baseline"),
    "missing": ("shop", "shop-quiet", "baseline", "bare", "floor"),  # a path no route has: 404
}
ROUNDS = 7
COMMON_ENV = {
    "PGLAYER_MAX_SIZE": "10",
    "PGLAYER_MIN_SIZE": "10",
    "PGLAYER_LOG_LEVEL": "INFO",
    "PGLAYER_SLOW_QUERY_THRESHOLD": "0",
    "PGLAYER_TUNE_GC": "true",
}


@dataclass(frozen=True)
class Figures:
    app: str
    route: str
    cpu_us: float
    calls: float
    statuses: dict[int, int]
    by_package: dict[str, float]


Request = tuple[str, str, bytes]


def _requests(route: str, n: int, max_id: int, product: int) -> list[Request]:
    rng = random.Random(7)
    out: list[Request] = []
    for _ in range(n):
        user = rng.randint(1, max_id)
        if route == "orders":
            body = orjson.dumps({"user_id": user, "product_id": product, "quantity": 1})
            out.append(("POST", "/orders", body))
        else:
            out.append(("GET", f"/{route}/{user}", b""))
    return out


def _scope(method: str, path: str, body: bytes) -> dict[str, Any]:
    headers = [(b"host", b"127.0.0.1:8000")]
    if body:
        headers += [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
        "scheme": "http",
        "method": method,
        "root_path": "",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": headers,
        "state": {},
    }


async def _one(app: Any, request: Request) -> int:
    method, path, body = request
    delivered = False
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.get_running_loop().create_future()  # the client never leaves
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(_scope(method, path, body), receive, send)
    return status


async def _drive(
    app: Any, requests: list[Request], statuses: dict[int, int], concurrency: int
) -> None:
    async def worker(mine: list[Request]) -> None:
        for request in mine:
            status = await _one(app, request)
            statuses[status] = statuses.get(status, 0) + 1

    await asyncio.gather(*(worker(requests[i::concurrency]) for i in range(concurrency)))


def _package(filename: str) -> str:
    if filename.startswith("~") or filename == "":
        return "builtins"
    parts = Path(filename).parts
    if "site-packages" in parts:
        return parts[parts.index("site-packages") + 1].removesuffix(".py")
    for top in ("pglayer", "pglayer_shop", "benchmarks"):
        if top in parts:
            return top
    return "stdlib"


def _split_by_package(stats: pstats.Stats, n: int) -> dict[str, float]:
    totals: dict[str, float] = {}
    for (filename, _line, _name), row in stats.stats.items():  # type: ignore[attr-defined]
        package = _package(filename)
        totals[package] = totals.get(package, 0.0) + row[2] * 1e6 / n  # tottime, µs
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def _load(name: str) -> Any:
    target, env = APPS[name]
    os.environ.update(env)  # the shop reads its settings when it is built
    module, _, attr = target.partition(":")
    obj = getattr(importlib.import_module(module), attr)
    return obj() if target.endswith("create_app") else obj


def _silence_logs() -> None:
    # Log lines are formatted as `serve` formats them, then written to /dev/null: the
    # formatting is counted, the terminal's I/O is not.
    sink = open(os.devnull, "w")  # noqa: SIM115  (lives as long as this child process)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(sink)


async def _measure(
    names: list[str], route: str, requests: list[Request], concurrency: int
) -> list[Figures]:
    """All apps in one process, measured in interleaved rounds: drift hits them alike."""
    apps = {name: _load(name) for name in names}
    _silence_logs()
    cpu: dict[str, float] = {}
    statuses: dict[str, dict[int, int]] = {name: {} for name in names}
    async with contextlib.AsyncExitStack() as stack:
        for app in apps.values():
            await stack.enter_async_context(app.router.lifespan_context(app))
        for app in apps.values():
            await _drive(app, requests[: len(requests) // 5], {}, concurrency)
        order = list(names)
        for _ in range(ROUNDS):
            random.shuffle(order)
            for name in order:
                gc.collect()
                started = time.process_time()
                await _drive(apps[name], requests, statuses[name], concurrency)
                spent = (time.process_time() - started) * 1e6 / len(requests)
                cpu[name] = min(cpu.get(name, spent), spent)
        figures = []
        sample = requests[: max(len(requests) // 10, 50)]
        for name, app in apps.items():
            profile = cProfile.Profile()
            profile.enable()
            await _drive(app, sample, {}, concurrency)
            profile.disable()
            stats = pstats.Stats(profile)
            calls = stats.total_calls / len(sample)  # type: ignore[attr-defined]
            by_package = _split_by_package(stats, len(sample))
            figures.append(Figures(name, route, cpu[name], calls, statuses[name], by_package))
    return figures


def _run_route(
    names: list[str], route: str, n: int, max_id: int, product: int, concurrency: int
) -> list[Figures]:
    requests = _requests(route, n, max_id, product)
    runner: Callable[[Awaitable[list[Figures]]], list[Figures]] = uvloop.run  # type: ignore[assignment]
    return runner(_measure(names, route, requests, concurrency))


def _child(names: list[str], route: str, args: tuple[int, int, int, int]) -> list[dict[str, Any]]:
    """Measure in a fresh process per route: imports and GC state start alike."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        figures = pool.apply(_run_route, (names, route, *args))
    return [f.__dict__ for f in figures]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hotpath", description=__doc__)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--routes", default=",".join(ROUTES))
    parser.add_argument("--apps", default=",".join(APPS))
    parser.add_argument(
        "--concurrency", type=int, default=8, help="requests in flight (below the pool size)"
    )
    parser.add_argument("--by-package", action="store_true")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)

    from benchmarks.run import prepare_database

    url, max_id, product, stop = prepare_database(quick=True)
    os.environ["DATABASE_URL"] = url
    os.environ.update(COMMON_ENV)
    rows: list[dict[str, Any]] = []
    try:
        for route in [r for r in args.routes.split(",") if r]:
            names = [a for a in args.apps.split(",") if a in ROUTES[route]]
            figures = (args.requests, max_id, product, args.concurrency)
            rows.extend(_child(names, route, figures))
    finally:
        stop()
    _print(rows, args.by_package)
    if args.json:
        Path(args.json).write_bytes(
            orjson.dumps(rows, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS)
        )


def _print(rows: list[dict[str, Any]], by_package: bool) -> None:
    print(f"{'route':<10} {'app':<11} {'CPU µs/req':>10} {'calls/req':>9}  vs bare  statuses")
    for row in rows:
        bare = next((r for r in rows if r["route"] == row["route"] and r["app"] == "bare"), None)
        ratio = f"{row['cpu_us'] / bare['cpu_us']:.2f}x" if bare else ""
        print(
            f"{row['route']:<10} {row['app']:<11} {row['cpu_us']:>10.1f} {row['calls']:>9.0f}"
            f"  {ratio:>7}  {row['statuses']}"
        )
        if by_package:
            parts = ", ".join(f"{k} {v:.0f}" for k, v in row["by_package"].items() if v >= 1)
            print(f"{'':<23}µs by package (cProfile): {parts}")


if __name__ == "__main__":
    main()
