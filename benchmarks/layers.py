"""What each of pglayer's layers costs per request, by difference between small apps.

    python -m benchmarks.layers [--requests 3000] [--instructions]

Each variant is a one-route FastAPI app that differs from another by one layer, driven
like `hotpath.py` on uvloop. By default all run in one process in interleaved rounds (the
least CPU of the rounds counts); on a shared 2-core machine that is noisy to a few µs.
`--instructions` counts instead, under valgrind's callgrind, the instructions each variant
executes per request ((N requests - 0 requests) / N, each in its own process): slow, but
the same to 0.1% from run to run. Only public API is used, so the same file measures an
older checkout (`PYTHONPATH=<checkout>/src`).

| layer | measured as |
|---|---|
| request layer | `setup(app, db)` vs the bare route (no query) |
| metrics + access log | the above plus `setup_metrics` and the access log to /dev/null |
| `db: Db` | a handler that takes `Db` (unused) vs one that does not |
| read path | `db.read(fetchval)` vs asyncpg's `pool.fetchval` of the same statement |
| serialise once | returning a model (FastAPI validates and serialises it) vs bytes |
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import gc
import os
import random
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
import uvloop
from fastapi import FastAPI, Response
from pydantic import BaseModel

from benchmarks.hotpath import _drive, _silence_logs
from pglayer import Database, DatabaseSettings, configure_logging
from pglayer.fastapi import Db, setup, setup_metrics

ROUNDS = 9
SQL = "SELECT 1"


class Row(BaseModel):
    id: int
    name: str
    email: str
    created_at: datetime


ROW = {"id": 7, "name": "Ada", "email": "ada@example.com", "created_at": datetime.now(UTC)}


def _database() -> Database:
    url = os.environ["DATABASE_URL"]
    return Database(DatabaseSettings(url=url, min_size=4, max_size=4, pooler="none"))


def _app(name: str) -> FastAPI:
    """The variant `name` (see the module docstring)."""
    pool: Any = None

    @asynccontextmanager
    async def raw_pool(app: FastAPI) -> AsyncIterator[None]:
        nonlocal pool
        pool = await asyncpg.create_pool(os.environ["DATABASE_URL"], min_size=4, max_size=4)
        yield
        await pool.close()

    app = FastAPI(lifespan=raw_pool if name in ("bare", "bare+query", "model") else None)
    db = None
    if name not in ("bare", "bare+query", "model"):
        db = _database()
        setup(app, db, access_log=name == "guard+metrics+log")
        if name == "guard+metrics+log":
            setup_metrics(app, db)

    if name in ("bare", "guard", "guard+metrics+log"):

        @app.get("/r/{i}")
        async def plain(i: int) -> Response:
            return Response(b"{}", media_type="application/json")

    elif name == "guard+Db":

        @app.get("/r/{i}")
        async def with_db(i: int, db: Db) -> Response:
            return Response(b"{}", media_type="application/json")

    elif name == "bare+query":

        @app.get("/r/{i}")
        async def bare_query(i: int) -> Response:
            await pool.fetchval(SQL)
            return Response(b"{}", media_type="application/json")

    elif name == "guard+Db+read":

        @app.get("/r/{i}")
        async def read(i: int, db: Db) -> Response:
            await db.read(lambda conn: conn.fetchval(SQL))
            return Response(b"{}", media_type="application/json")

    elif name == "model":

        @app.get("/r/{i}")
        async def model(i: int) -> Row:
            return Row(**ROW)

    elif name == "bytes":

        @app.get("/r/{i}")
        async def as_bytes(i: int) -> Response:
            return Response(
                orjson.dumps(ROW, option=orjson.OPT_UTC_Z), media_type="application/json"
            )

    return app


VARIANTS = (
    "bare",
    "guard",
    "guard+metrics+log",
    "guard+Db",
    "bare+query",
    "guard+Db+read",
    "model",
    "bytes",
)
LAYERS = (
    ("request layer (setup)", "guard", "bare"),
    ("metrics + access log", "guard+metrics+log", "guard"),
    ("`db: Db` parameter", "guard+Db", "guard"),
    ("read path (db.read vs pool.fetchval)", "guard+Db+read", "guard+Db", "bare+query", "bare"),
    ("serialise once (model vs bytes)", "model", "bytes"),
)


async def _measure(n: int) -> dict[str, float]:
    apps = {name: _app(name) for name in VARIANTS}
    requests = [("GET", f"/r/{random.randint(1, 1000)}", b"") for _ in range(n)]
    cpu: dict[str, float] = {}
    async with contextlib.AsyncExitStack() as stack:
        for app in apps.values():
            await stack.enter_async_context(app.router.lifespan_context(app))
        _silence_logs()
        for app in apps.values():
            await _drive(app, requests[: n // 5], {}, 4)
        order = list(VARIANTS)
        for _ in range(ROUNDS):
            random.shuffle(order)
            for name in order:
                gc.collect()
                statuses: dict[int, int] = {}
                started = time.process_time()
                await _drive(apps[name], requests, statuses, 4)
                spent = (time.process_time() - started) * 1e6 / n
                assert set(statuses) == {200}, (name, statuses)
                cpu[name] = min(cpu.get(name, spent), spent)
    return cpu


async def _run_one(name: str, n: int) -> None:
    app = _app(name)
    requests = [("GET", f"/r/{random.randint(1, 1000)}", b"") for _ in range(max(n, 200))]
    async with app.router.lifespan_context(app):
        _silence_logs()
        await _drive(app, requests[:200], {}, 4)
        if n:
            await _drive(app, requests[:n], {}, 4)


def _instructions(name: str, n: int) -> int:
    """Instructions of one process that serves `n` requests of `name` (after a warm-up)."""
    out = subprocess.run(
        [
            "valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
            sys.executable, "-m", "benchmarks.layers", "--one", name, str(n),
        ],
        capture_output=True, text=True, check=True, timeout=1800,
    ).stderr  # fmt: skip
    match = re.search(r"Collected : (\d+)", out)
    if match is None:
        raise RuntimeError(f"callgrind printed no count:\n{out[-2000:]}")
    return int(match.group(1))


def _count(n: int) -> dict[str, float]:
    jobs = [(name, k) for name in VARIANTS for k in (0, n)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        counts = dict(zip(jobs, pool.map(lambda job: _instructions(*job), jobs), strict=True))
    return {name: (counts[name, n] - counts[name, 0]) / n / 1000 for name in VARIANTS}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.layers", description=__doc__)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--instructions", action="store_true", help="count, under callgrind")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    configure_logging(format="text")
    if args.one:
        uvloop.run(_run_one(args.one[0], int(args.one[1])))
        return
    from benchmarks.run import prepare_database

    url, _, _, stop = prepare_database(quick=True)
    os.environ["DATABASE_URL"] = url
    try:
        if args.instructions:
            figures, unit = _count(min(args.requests, 2000)), "k instr/req"
        else:
            figures, unit = uvloop.run(_measure(args.requests)), "CPU µs/req"
    finally:
        stop()
    print(f"{'variant':<24} {unit:>12}")
    for name in VARIANTS:
        print(f"{name:<24} {figures[name]:>12.1f}")
    print()
    print(f"{'layer':<40} {unit:>12}")
    for label, a, b, *rest in LAYERS:
        cost = figures[a] - figures[b]
        if rest:
            cost -= figures[rest[0]] - figures[rest[1]]
        print(f"{label:<40} {cost:>12.1f}")


if __name__ == "__main__":
    main()
