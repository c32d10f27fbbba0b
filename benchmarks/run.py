"""`pglayer-shop bench`: the shop against a naive baseline, the bare FastAPI route and the
framework floor, under load.

Starts PostgreSQL if needed (DATABASE_URL, else the embedded server), seeds a fixed data
set once, serves each app with uvicorn (uvloop + httptools) in its own processes, warms it,
drives load (wrk + Lua, else the asyncio generator), and writes a table, JSON and a PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import orjson
import psutil  # type: ignore[import-untyped]
from pglayer_shop.schema import apply_migrations
from pglayer_shop.seed import SeedCounts, seed
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from benchmarks.load import (
    Group,
    LoadResult,
    percentile,
    run_asyncio,
    run_groups,
    run_wrk,
    wrk_available,
)
from pglayer import (
    Database,
    DatabaseSettings,
    EmbeddedPostgres,
    PglayerError,
    configure_logging,
)
from pglayer._dsn import describe_target
from pglayer._errors import explain_connect_error
from pglayer._http import PROTOCOL
from pglayer._serve import event_loop

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
console = Console(width=200)

APPS = {
    "shop": ["--factory", "pglayer_shop.app:create_app"],
    "baseline": ["benchmarks.baselines.naive:app"],
    "bare": ["benchmarks.bare:app"],
    "floor": ["benchmarks.floor:app"],
}
# uvicorn's HTTP protocol and event loop per app: the shop is served as `pglayer serve` serves
# it (httptools with pglayer's bounds, answering refusals itself while the pool is saturated:
# see pglayer._http; uvloop with a server that accepts a burst of connections at once: see
# pglayer._loop); the others as uvicorn serves them by default.
HTTP = {"shop": PROTOCOL}
LOOP = {"shop": event_loop()}
# What each app implements; the floor only does the reads.
SCENARIOS = {
    "users": ("shop", "baseline", "bare", "floor"),
    "dashboard": ("shop", "baseline", "bare", "floor"),
    "orders": ("shop", "baseline"),
    "mix": ("shop", "baseline"),
}
POOL_MAX = 10  # every app gets 10 connections per worker
# Bounds of the options: every server runs at once, each worker with POOL_MAX connections.
MAX_WORKERS = 16
MAX_CONCURRENCY = 16_384
MAX_ROUNDS = 15
# The overload run uses a small wait bound, so that 4x (pool + bound) is a load the
# generator can offer on 2 cores; the default (1000) would need 4,040 clients per worker.
OVERLOAD_WAITERS = 100


@dataclass(frozen=True)
class Plan:
    quick: bool
    workers: list[int]
    concurrency: list[int]
    duration: float
    warmup: float
    scenarios: list[str]
    servers: list[str]
    generator: str
    overload: bool
    storm: bool
    hotrow: bool
    metrics_overhead: bool
    via_pgbouncer: bool
    granian: bool
    rounds: int = 1


# -- the database ----------------------------------------------------------------------


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, ""))


async def _prepare(url: str, counts: SeedCounts) -> int:
    """Create and seed the benchmark database once; return the id of the ample product."""
    name = urlsplit(url).path.lstrip("/")
    admin = await asyncpg.connect(_with_database(url, "postgres"))
    try:
        if not await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    settings = DatabaseSettings(url=url, min_size=1, max_size=2, require_on_startup=True)
    async with Database(settings) as db:
        await apply_migrations(db)
        have = await db.run(lambda c: c.fetchval("SELECT count(*) FROM users"))
        if have < counts.users:
            console.print(f"seeding {counts.users} users, {counts.orders} orders into {name}")
            started = time.perf_counter()
            await seed(db, counts)
            console.print(f"seeded in {time.perf_counter() - started:.1f}s")
        async with db.transaction() as conn:
            # Orders must never fail for stock or money, whatever the run length.
            await conn.execute("UPDATE accounts SET balance = 1000000000 WHERE balance < 1000000")
            product = await conn.fetchval(
                "SELECT id FROM products WHERE name = 'bench: ample stock'"
            ) or await conn.fetchval(
                "INSERT INTO products (name, price, stock)"
                " VALUES ('bench: ample stock', 0.01, 1000000000) RETURNING id"
            )
            await conn.execute("UPDATE products SET stock = 1000000000 WHERE id = $1", product)
        await db.run(lambda c: c.execute("VACUUM ANALYZE"), retry=False)
    return int(product)


# -- the servers -----------------------------------------------------------------------


class RssSampler(threading.Thread):
    """Peak RSS of each process in a server's tree, sampled every 0.2 s."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.peak: dict[int, int] = {}
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.2):
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            for p in procs:
                try:
                    rss = p.memory_info().rss
                except psutil.NoSuchProcess:
                    continue
                self.peak[p.pid] = max(self.peak.get(p.pid, 0), rss)

    def peak_worker_mib(self) -> float:
        values = [v for pid, v in self.peak.items() if pid != self.root.pid] or list(
            self.peak.values()
        )
        return max(values, default=0) / 2**20


class ConnectionSampler(threading.Thread):
    """Peak number of server connections (client backends) of one application."""

    def __init__(self, admin_url: str, database: str, application_name: str) -> None:
        super().__init__(daemon=True)
        self.admin_url = admin_url
        self.database = database
        self.application_name = application_name
        self.peak = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        asyncio.run(self._sample())

    async def _sample(self) -> None:
        conn = await asyncpg.connect(self.admin_url)
        try:
            while not self.stopped.is_set():
                n = await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = $1"
                    " AND backend_type = 'client backend' AND application_name = $2",
                    self.database,
                    self.application_name,
                )
                self.peak = max(self.peak, int(n))
                await asyncio.sleep(0.2)
        finally:
            await conn.close()


class Server:
    def __init__(
        self, app: str, workers: int, url: str, env: dict[str, str], asgi_server: str = "uvicorn"
    ) -> None:
        self.asgi_server = asgi_server
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app
        self.workers = workers
        self.env = {**os.environ, **env, "DATABASE_URL": url, "PYTHONPATH": str(ROOT)}
        self.proc: subprocess.Popen[bytes] | None = None
        # The shop's access log goes here (written as `serve` writes it, then thrown away).
        self.log = tempfile.TemporaryFile()  # noqa: SIM115  (closed in __exit__)

    def __enter__(self) -> Server:
        if self.asgi_server == "granian":
            target = APPS[self.app][-1]
            factory = ["--factory"] if "--factory" in APPS[self.app] else []
            cmd = [
                sys.executable, "-m", "granian", "--interface", "asgi", *factory,
                "--loop", "uvloop", "--host", "127.0.0.1", "--port", str(self.port),
                "--workers", str(self.workers), "--no-access-log", "--log-level", "warning",
                "--backlog", "4096", target,
            ]  # fmt: skip
        else:
            cmd = [
                sys.executable, "-m", "uvicorn", *APPS[self.app],
                "--host", "127.0.0.1", "--port", str(self.port),
                "--workers", str(self.workers), "--loop", LOOP.get(self.app, "uvloop"),
                "--http", HTTP.get(self.app, "httptools"),
                "--no-access-log", "--log-level", "warning", "--backlog", "4096",
            ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, env=self.env, cwd=ROOT, stderr=self.log)
        try:
            wait_until_serving(self.proc, self.url, self.app)
        except RuntimeError as exc:
            self.log.seek(0)
            tail = self.log.read()[-3000:].decode(errors="replace")
            self._stop()  # __exit__ does not run when __enter__ raises
            raise RuntimeError(f"{exc}:\n{tail}") from None
        except BaseException:  # a signal while it starts: left running, it outlived the run
            self._stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()
        self.log.close()

    def log_size(self) -> int:
        return os.fstat(self.log.fileno()).st_size

    def app_p99_ms(self, since: int) -> float | None:
        """p99 of the durations the app's own access log wrote after byte `since`: from the
        app starting on a request to its end, so the client's p99 less this is the time
        spent before the app (accept, first read) and after it. None without an access log.
        """
        fd = self.log.fileno()
        # pread: the server's processes write through the same file offset; never move it.
        text = os.pread(fd, self.log_size() - since, since).decode(errors="replace")
        durations = [float(m) for m in _ACCESS_DURATION.findall(text)]
        return percentile(durations, 0.99) if durations else None

    def _stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # our own child, by its PID
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wait_until_serving(
    proc: subprocess.Popen[bytes], url: str, name: str, timeout: float = 60.0
) -> None:
    """Return once `url` answers `GET /users/1` with 200; RuntimeError if `proc` exits or
    `timeout` seconds pass first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}")
        try:
            # Generous per try: a server under callgrind answers its first request slowly.
            if httpx.get(f"{url}/users/1", timeout=10).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{name} did not start")


_ACCESS_DURATION = re.compile(r" pglayer\.access .* ([0-9]+\.[0-9])ms route=.*$", re.M)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of a server's processes (its workers included) so far."""
    total = 0.0
    root = psutil.Process(pid)
    for proc in (root, *root.children(recursive=True)):
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- running ---------------------------------------------------------------------------


def _load(
    plan: Plan, url: str, scenario: str, c: int, seconds: float, max_id: int, product: int
) -> LoadResult:
    if plan.generator == "wrk":
        return run_wrk(url, scenario, c, seconds, max_id, product)
    return run_asyncio(url, scenario, c, seconds, max_id, product)


def _row(
    server: str, scenario: str, workers: int, c: int, r: LoadResult, rss: float,
    conns: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    out = asdict(r)
    out.update(server=server, scenario=scenario, workers=workers, concurrency=c,
               rps=round(r.rps, 1), rss_mib=round(rss, 1), server_connections=conns)  # fmt: skip
    return out


_BASE_ENV = {
    "PGLAYER_MAX_SIZE": str(POOL_MAX),
    "PGLAYER_MIN_SIZE": str(POOL_MAX),
    # As `pglayer serve` runs it: access log (text), metrics, frozen GC.
    "PGLAYER_ACCESS_LOG": "true",
    "PGLAYER_LOG_FORMAT": "text",
    "PGLAYER_LOG_LEVEL": "INFO",
    "PGLAYER_SLOW_QUERY_THRESHOLD": "0",
    "PGLAYER_TUNE_GC": "true",
}


def run(plan: Plan, url: str, max_id: int, product: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    servers = list(plan.servers)
    if plan.metrics_overhead and "shop" in servers:
        servers.append("shop-quiet")
    if plan.granian:
        servers.append("shop-granian")
    with contextlib.ExitStack() as stack:  # stops PgBouncer however the run ends
        targets = {name: url for name in servers}
        if plan.via_pgbouncer:
            from pglayer._pgbouncer import PgBouncer

            # Transaction pooling, 5 server connections for all workers' pools together.
            bouncer = stack.enter_context(PgBouncer(url, pool_mode="transaction", pool_size=5))
            targets["shop-pgbouncer"] = bouncer.url(urlsplit(url).path.lstrip("/"))
        for workers in plan.workers:
            rows.extend(_points(plan, targets, workers, max_id, product))
            if plan.overload:
                rows.extend(_overload(plan, url, workers, _BASE_ENV, max_id, product))
            if plan.storm:
                # Each server's peak: its users req/s at the lowest concurrency measured (64).
                lowest = min(plan.concurrency)
                peaks = {
                    r["server"]: r["rps"]
                    for r in rows
                    if (r["scenario"], r["workers"], r["concurrency"]) == ("users", workers, lowest)
                }
                rows.extend(_storm(plan, url, workers, _BASE_ENV, max_id, product, peaks))
            if plan.hotrow:
                rows.extend(_hotrow(plan, url, workers, _BASE_ENV, max_id, product))
    return rows


def _points(
    plan: Plan, targets: dict[str, str], workers: int, max_id: int, product: int
) -> list[dict[str, Any]]:
    """Every scenario at every concurrency against every server (named to its database URL),
    each with `workers` workers, all serving at once: each point is measured for each in
    turn, the order rotating, so that a slower moment of a shared machine hits them alike."""
    rows: list[dict[str, Any]] = []
    any_url = next(iter(targets.values()))
    database = urlsplit(any_url).path.lstrip("/")
    admin_url = _with_database(any_url, "postgres")
    with contextlib.ExitStack() as stack:
        running: dict[str, Server] = {}
        for name, target in targets.items():
            app = "shop" if name.startswith("shop") else name
            # The defaults: admission by predicted wait decides what waits, not a sized bound.
            env = {**_BASE_ENV, "PGLAYER_APPLICATION_NAME": f"bench-{name}"}
            if name == "shop-quiet":
                env["PGLAYER_METRICS"] = env["PGLAYER_ACCESS_LOG"] = "false"
            asgi_server = "granian" if name == "shop-granian" else "uvicorn"
            running[name] = stack.enter_context(Server(app, workers, target, env, asgi_server))
        for server in running.values():
            _load(plan, server.url, "users", 64, plan.warmup, max_id, product)
            _load(plan, server.url, "dashboard", 64, plan.warmup, max_id, product)
        turn = 0
        for scenario in plan.scenarios:
            for c in plan.concurrency:
                names = [n for n in targets if running[n].app in SCENARIOS[scenario]]
                samples: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
                # Rounds interleave the servers (each round in another order), so that
                # drift and noise hit them alike; each keeps its median round.
                for _ in range(plan.rounds):
                    turn += 1
                    for name in names[turn % len(names) :] + names[: turn % len(names)]:
                        row = _measure(
                            plan, running[name], name, scenario, workers, c,
                            admin_url, database, max_id, product,
                        )  # fmt: skip
                        samples[name].append(row)
                        if plan.rounds > 1:
                            _print_progress(row)
                for name in names:
                    rows.append(median_row(samples[name]))
                    _print_progress(rows[-1])
    return rows


def _overload(
    plan: Plan, url: str, workers: int, env: dict[str, str], max_id: int, product: int
) -> list[dict[str, Any]]:
    """4x what the shop's pools can hold (10 connections + 100 waiters per worker)."""
    c = 4 * workers * (POOL_MAX + OVERLOAD_WAITERS)
    rows = []
    env = {**env, "PGLAYER_MAX_WAITERS": str(OVERLOAD_WAITERS)}
    for name in ("shop", "baseline"):
        with Server(name, workers, url, env) as server:
            assert server.proc is not None
            sampler = RssSampler(server.proc.pid)
            sampler.start()
            result = run_asyncio(server.url, "dashboard", c, plan.duration, max_id, product)
            sampler.stopped.set()
            sampler.join()
        rows.append(_row(name, "overload", workers, c, result, sampler.peak_worker_mib()))
        _print_progress(rows[-1])
    return rows


# The storm's acquire deadline: short, as a latency-sensitive service would set it, so that
# the predicted wait can exceed it twice over with fewer than ~1,500 clients.
STORM_ACQUIRE_TIMEOUT = 0.05
STORM_MAX_CLIENTS = 1500


def _measure(
    plan: Plan, server: Server, name: str, scenario: str, workers: int, c: int,
    admin_url: str, database: str, max_id: int, product: int,
) -> dict[str, Any]:  # fmt: skip
    """One point: load one server, sampling its RSS, server connections and CPU."""
    assert server.proc is not None
    sampler = RssSampler(server.proc.pid)
    conns = ConnectionSampler(admin_url, database, f"bench-{name}")
    sampler.start()
    conns.start()
    cpu, logged = _cpu_seconds(server.proc.pid), server.log_size()
    result = _load(plan, server.url, scenario, c, plan.duration, max_id, product)
    cpu = _cpu_seconds(server.proc.pid) - cpu
    for thread in (sampler, conns):
        thread.stopped.set()
        thread.join()
    peak = conns.peak if name.startswith("shop") else None
    row = _row(name, scenario, workers, c, result, sampler.peak_worker_mib(), peak)
    row["cpu_us_per_request"] = round(cpu * 1e6 / max(result.requests, 1), 1)
    row["app_p99_ms"] = server.app_p99_ms(logged)
    return row


def median_row(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median req/s (the lower one of an even count), with every
    round's req/s beside it."""
    ordered = sorted(samples, key=lambda row: row["rps"])
    row = dict(ordered[(len(ordered) - 1) // 2])
    if len(samples) > 1:
        row["rps_rounds"] = [r["rps"] for r in samples]
    return row


def _storm(
    plan: Plan, url: str, workers: int, env: dict[str, str], max_id: int, product: int,
    peaks: dict[str, float],
) -> list[dict[str, Any]]:  # fmt: skip
    """Clients that retry at once on any answer, enough of them that the queue would be twice
    the acquire deadline long: `2 x peak req/s x deadline` (the shop's users peak).

    The storm's clients are the asyncio generator (it tells refusals from served requests;
    wrk cannot), which takes far more CPU per request than wrk, on the same cores as the
    server: so each server's peak is also measured with that generator, 64 clients, just
    before its storm, and goodput is compared with both peaks."""
    peak = peaks.get("shop") or 2000.0
    c = min(STORM_MAX_CLIENTS, math.ceil(2 * peak * STORM_ACQUIRE_TIMEOUT) + POOL_MAX * workers)
    env = {**env, "PGLAYER_ACQUIRE_TIMEOUT": str(STORM_ACQUIRE_TIMEOUT)}
    rows = []
    for name in ("shop", "baseline"):
        with Server(name, workers, url, env) as server:
            assert server.proc is not None
            same_client = run_asyncio(server.url, "users", 64, plan.duration, max_id, product)
            sampler = RssSampler(server.proc.pid)
            sampler.start()
            result = run_groups(
                server.url, [Group("all", "users", c)], plan.duration, max_id, product
            )["all"]
            sampler.stopped.set()
            sampler.join()
        row = _row(name, "storm", workers, c, result, sampler.peak_worker_mib())
        row["peak_rps"] = peaks.get(name)
        row["peak_goodput_same_client"] = same_client.goodput
        rows.append(row)
        _print_progress(row)
    return rows


HOTROW_CLIENTS = 64  # per group


def _hotrow(
    plan: Plan, url: str, workers: int, env: dict[str, str], max_id: int, product: int
) -> list[dict[str, Any]]:
    """One product row locked by another connection for the whole run, while one group of
    clients orders that product and another reads users."""
    rows = []
    groups = [
        Group("orders", "orders", HOTROW_CLIENTS),
        Group("reads", "users", HOTROW_CLIENTS),
    ]
    for name in ("shop", "baseline"):
        with Server(name, workers, url, env) as server, RowLock(url, product):
            results = run_groups(server.url, groups, plan.duration, max_id, product)
        for group, result in results.items():
            row = _row(name, f"hotrow-{group}", workers, HOTROW_CLIENTS, result, 0.0)
            rows.append(row)
            _print_progress(row)
    return rows


class RowLock(threading.Thread):
    """One product row held locked by a connection of its own, until the block ends."""

    def __init__(self, url: str, product: int) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.product = product
        self.locked = threading.Event()
        self.stopped = threading.Event()

    def __enter__(self) -> RowLock:
        self.start()
        if not self.locked.wait(30):
            raise RuntimeError("the row lock was not taken")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.join(30)

    def run(self) -> None:
        asyncio.run(self._hold())

    async def _hold(self) -> None:
        conn = await asyncpg.connect(self.url)
        try:
            await conn.execute("BEGIN")
            await conn.execute("SELECT 1 FROM products WHERE id = $1 FOR UPDATE", self.product)
            self.locked.set()
            await asyncio.to_thread(self.stopped.wait)
        finally:
            await conn.close()


def _print_progress(row: dict[str, Any]) -> None:
    app = row.get("app_p99_ms")
    console.print(
        f"  {row['scenario']:<9} {row['server']:<14} w={row['workers']} c={row['concurrency']:<5}"
        f" {row['rps']:>8.0f} req/s  p50 {row['p50_ms']:.1f} ms  p99 {row['p99_ms']:.1f} ms"
        + (f" (in the app {app:.1f} ms)" if app is not None else "")
        + f"  non-2xx {row['non2xx']}  sock {row['socket_errors']}  rss {row['rss_mib']} MiB"
        f"  cpu {row.get('cpu_us_per_request')} µs/req"
        f"  server conns {row.get('server_connections')}"
    )


# -- reporting -------------------------------------------------------------------------


def _ratio(rows: list[dict[str, Any]], row: dict[str, Any], other: str, key: str) -> float | None:
    for r in rows:
        if (r["server"], r["scenario"], r["workers"], r["concurrency"]) == (
            other,
            row["scenario"],
            row["workers"],
            row["concurrency"],
        ):
            return row[key] / r[key] if r[key] else None
    return None


def report(rows: list[dict[str, Any]], meta: dict[str, Any]) -> Path:
    table = Table(title="pglayer-shop bench")
    columns = (
        "scenario", "w", "conc", "server", "req/s", "p50 ms", "p99 ms", "app p99", "max ms",
        "non-2xx", "sock err", "RSS MiB", "CPU µs/req", "server conns", "rps/baseline", "rps/bare",
        "rps/floor", "p99/baseline",
    )  # fmt: skip
    for col in columns:
        table.add_column(col, justify="right")

    def fmt(x: float | None, spec: str = ".2f") -> str:
        return "" if x is None else format(x, spec)

    for r in rows:
        is_shop = r["server"] == "shop"
        table.add_row(
            r["scenario"], str(r["workers"]), str(r["concurrency"]), r["server"],
            f"{r['rps']:.0f}", f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}",
            fmt(r.get("app_p99_ms"), ".1f"), f"{r['max_ms']:.0f}",
            str(r["non2xx"]), str(r["socket_errors"]), f"{r['rss_mib']:.0f}",
            str(r.get("cpu_us_per_request", "")),
            str(r.get("server_connections") or ""),
            fmt(_ratio(rows, r, "baseline", "rps")) if is_shop else "",
            fmt(_ratio(rows, r, "bare", "rps")) if is_shop else "",
            fmt(_ratio(rows, r, "floor", "rps")) if is_shop else "",
            fmt(_ratio(rows, r, "baseline", "p99_ms")) if is_shop else "",
        )  # fmt: skip
    console.print(table)
    for r in rows:
        if r["scenario"] == "overload":
            served = sum(n for s, n in r["statuses"].items() if int(s) < 300)
            console.print(
                f"overload {r['server']} w={r['workers']} c={r['concurrency']}: served {served}"
                f" (p99 {fmt(r['served_p99_ms'], '.0f')} ms), shed/failed {r['non2xx']}"
                f" (503 p99 {fmt(r['shed_p99_ms'], '.1f')} ms, with Retry-After:"
                f" {r['shed_with_retry_after']}), statuses {r['statuses']}"
            )
    _report_storm(rows)
    _report_hotrow(rows)
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS / f"bench-{stamp}.json"
    path.write_bytes(
        orjson.dumps(
            {"meta": meta, "rows": rows}, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS
        )
    )
    png = _chart(rows, path.with_suffix(".png"))
    console.print(f"results: {path}" + (f" and {png}" if png else ""))
    return path


def _report_storm(rows: list[dict[str, Any]]) -> None:
    storm = [r for r in rows if r["scenario"] == "storm"]
    if not storm:
        return
    table = Table(title=f"storm: clients retry at once (acquire deadline {STORM_ACQUIRE_TIMEOUT}s)")
    for col in (
        "server", "w", "clients", "goodput 2xx/s", "peak, wrk (c=64)", "goodput/peak",
        "peak, same client", "goodput/peak", "served p99 ms", "refused", "refusal p99 ms",
        "with Retry-After", "statuses",
    ):  # fmt: skip
        table.add_column(col, justify="right")
    for r in storm:
        peak, same = r.get("peak_rps"), r.get("peak_goodput_same_client")
        table.add_row(
            r["server"], str(r["workers"]), str(r["concurrency"]), f"{r['goodput']:.0f}",
            f"{peak:.0f}" if peak else "", f"{r['goodput'] / peak:.2f}" if peak else "",
            f"{same:.0f}" if same else "", f"{r['goodput'] / same:.2f}" if same else "",
            f"{r['served_p99_ms']:.0f}", str(r["non2xx"]),
            f"{r['shed_p99_ms']:.0f}" if r["shed_p99_ms"] is not None else "",
            str(r["shed_with_retry_after"]), str(r["statuses"]),
        )  # fmt: skip
    console.print(table)


def _report_hotrow(rows: list[dict[str, Any]]) -> None:
    hot = [r for r in rows if r["scenario"].startswith("hotrow-")]
    if not hot:
        return
    table = Table(title="hotrow: one product row locked by another connection all along")
    for col in (
        "server", "w", "group", "req/s", "p50 ms", "p99 ms", "max ms", "statuses", "codes",
        "503 with Retry-After", "sock err",
    ):  # fmt: skip
        table.add_column(col, justify="right")
    for r in hot:
        table.add_row(
            r["server"], str(r["workers"]), r["scenario"].removeprefix("hotrow-"),
            f"{r['rps']:.0f}", f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}", f"{r['max_ms']:.0f}",
            str(r["statuses"]), str(r["codes"]), str(r["shed_with_retry_after"]),
            str(r["socket_errors"]),
        )  # fmt: skip
    console.print(table)


def _chart(rows: list[dict[str, Any]], path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["scenario"], r["workers"]) for r in rows if r["scenario"] in SCENARIOS})
    if not groups:
        return None
    fig, axes = plt.subplots(2, len(groups), figsize=(4 * len(groups), 7), squeeze=False)
    for i, (scenario, workers) in enumerate(groups):
        for server in sorted({r["server"] for r in rows}):
            pts = sorted(
                (r["concurrency"], r["rps"], r["p99_ms"]) for r in rows
                if (r["scenario"], r["workers"], r["server"]) == (scenario, workers, server)
            )  # fmt: skip
            if not pts:
                continue
            xs = [p[0] for p in pts]
            axes[0][i].plot(xs, [p[1] for p in pts], marker="o", label=server)
            axes[1][i].plot(xs, [p[2] for p in pts], marker="o", label=server)
        axes[0][i].set_title(f"{scenario}, {workers} worker(s)")
        axes[0][i].set_ylabel("req/s")
        axes[1][i].set_ylabel("p99 ms")
        for ax in (axes[0][i], axes[1][i]):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrency")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# -- entry point -----------------------------------------------------------------------


def _counts(quick: bool) -> SeedCounts:
    return SeedCounts(5_000, 100, 20_000) if quick else SeedCounts(100_000, 1_000, 500_000)


def prepare_database(
    *, quick: bool, data_dir: Path = ROOT / ".pglayer"
) -> tuple[str, int, int, Callable[[], None]]:
    """The seeded benchmark database: its URL, the highest user id, the ample product, and
    a function that stops the embedded server if one was started for it."""
    counts = _counts(quick)
    database = "pglayer_bench_quick" if quick else "pglayer_bench"
    embedded = None
    base_url = os.environ.get("DATABASE_URL")
    if not base_url:
        embedded = EmbeddedPostgres(data_dir, database=database)
        base_url = embedded.start()
    url = _with_database(base_url, database)

    def stop() -> None:
        if embedded is not None:
            embedded.stop()

    try:
        product = asyncio.run(_prepare(url, counts))
    except BaseException:
        stop()
        raise
    return url, counts.users, product, stop


def _whole_numbers(most: int) -> Callable[[str], list[int]]:
    """argparse's type for a comma list of whole numbers from 1 to `most`, in ASCII digits."""

    def parse(text: str) -> list[int]:
        parts = [part.strip() for part in text.split(",")]
        # Not int(): it takes other scripts' digits and "1_0", and has no upper bound; a
        # runaway `--workers` starts processes until the machine gives out.
        if not all(re.fullmatch(r"[0-9]{1,9}", part) for part in parts):
            raise argparse.ArgumentTypeError(f"not a comma list of whole numbers: {text!r}")
        values = [int(part) for part in parts]
        if not all(1 <= value <= most for value in values):
            said = "each must be" if len(values) > 1 else "must be"
            raise argparse.ArgumentTypeError(f"{said} from 1 to {most}: {text!r}")
        if len(set(values)) < len(values):
            raise argparse.ArgumentTypeError(f"a number given twice: {text!r}")
        return values

    return parse


def _whole_number(most: int) -> Callable[[str], int]:
    """argparse's type for one whole number from 1 to `most`."""
    numbers = _whole_numbers(most)

    def parse(text: str) -> int:
        if "," in text:
            raise argparse.ArgumentTypeError(f"one number, not a list: {text!r}")
        return numbers(text)[0]

    return parse


def _names(known: Collection[str]) -> Callable[[str], list[str]]:
    """argparse's type for a comma list of names, each one of `known`."""

    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",")]
        if "" in names:
            raise argparse.ArgumentTypeError(f"an empty name in {text!r}")
        unknown = [name for name in names if name not in known]
        if unknown:
            said = ", ".join(repr(name) for name in unknown)
            raise argparse.ArgumentTypeError(f"{said} (choose from {', '.join(known)})")
        if len(set(names)) < len(names):
            raise argparse.ArgumentTypeError(f"a name given twice: {text!r}")
        return names

    return parse


def _seconds(text: str) -> float:
    """argparse's type for a run's length: from 1 second to an hour, in ASCII digits."""
    if not re.fullmatch(
        r"[0-9]{1,4}(\.[0-9]{1,3})?", text.strip()
    ):  # float() takes other digits, 1_0
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}")
    value = float(text)
    if not 1 <= value <= 3600:  # below a second, a run measures nothing
        raise argparse.ArgumentTypeError(f"must be from 1 to 3600: {text!r}")
    return value


_stopped_by: list[int] = []  # the signal that asked the benchmark to stop, once one has


def _stop_on_signals() -> None:
    """Unwind on SIGTERM (and SIGINT), so that the benchmark's servers, PgBouncer and
    embedded PostgreSQL are stopped on the way out (killed, it leaves them running)."""

    def stop(signum: int, _frame: object) -> None:
        # Once: the unwinding stops each child within a bounded wait; a second signal
        # (a terminal sends SIGINT to the whole group, `pglayer-shop bench` passes it on)
        # must not cut it short.
        for each in (signal.SIGINT, signal.SIGTERM):
            signal.signal(each, signal.SIG_IGN)
        _stopped_by.append(signum)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise SystemExit(128 + signum) from None
        # Raised here, an exception would end in the loop's handler of the callback it
        # interrupted; a stopped loop makes run_until_complete raise instead.
        loop.stop()

    for each in (signal.SIGINT, signal.SIGTERM):
        signal.signal(each, stop)


def _prepared(quick: bool, data_dir: Path) -> tuple[str, int, int, Callable[[], None]]:
    """`prepare_database`, a database it cannot reach or start said in one line (it was a
    traceback), a JSON record under `PGLAYER_LOG_FORMAT=json`; exit status 1."""
    try:
        DatabaseSettings()  # a DATABASE_URL that is not one: said as the commands say it
    except ValidationError as exc:
        wrong = "; ".join(str(e["msg"]) for e in exc.errors(include_input=False))
        _say_error(f"invalid settings: {wrong}")
        raise SystemExit(1) from None
    try:
        return prepare_database(quick=quick, data_dir=data_dir)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, PglayerError) as exc:
        url = os.environ.get("DATABASE_URL")
        if isinstance(exc, PglayerError) or not url:
            said = str(exc)
        else:
            said = explain_connect_error(exc, describe_target(url))
        _say_error(f"cannot prepare the benchmark's database: {said}")
        raise SystemExit(1) from None


def _say_error(message: str) -> None:
    """An error line on stderr, or a JSON record under `PGLAYER_LOG_FORMAT=json`."""
    if os.environ.get("PGLAYER_LOG_FORMAT", "").strip().lower() == "json":
        configure_logging(format="json")
        logging.getLogger("pglayer_shop").error("%s", message)
    else:
        print(f"pglayer-shop bench: error: {message}", file=sys.stderr)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one JSON record under `PGLAYER_LOG_FORMAT=json`, as the other
    commands of `pglayer-shop` write theirs."""

    def error(self, message: str) -> NoReturn:
        if os.environ.get("PGLAYER_LOG_FORMAT", "").strip().lower() != "json":
            super().error(message)
        _say_error(f"usage: {self.prog}: {message}")
        raise SystemExit(2)


def parser() -> argparse.ArgumentParser:
    """The benchmark's options, each bounded."""
    parser = _Parser(prog="pglayer-shop bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a short smoke run (CI)")
    parser.add_argument("--workers", type=_whole_numbers(MAX_WORKERS), default=None,
                        help=f"comma list, e.g. 1,2 (each at most {MAX_WORKERS})")  # fmt: skip
    parser.add_argument("--concurrency", type=_whole_numbers(MAX_CONCURRENCY), default=None,
                        help="comma list, e.g. 64,256,1024"
                        f" (each at most {MAX_CONCURRENCY})")  # fmt: skip
    parser.add_argument("--duration", type=_seconds, default=None,
                        help="seconds per run (1 to 3600)")  # fmt: skip
    parser.add_argument("--scenarios", type=_names(SCENARIOS), default=list(SCENARIOS),
                        help=f"comma list of {', '.join(SCENARIOS)} (default: all)")  # fmt: skip
    parser.add_argument("--servers", type=_names(APPS), default=list(APPS),
                        help=f"comma list of {', '.join(APPS)} (default: all)")  # fmt: skip
    parser.add_argument("--generator", choices=["auto", "wrk", "asyncio"], default="auto")
    parser.add_argument("--no-overload", action="store_true")
    parser.add_argument("--no-storm", action="store_true",
                        help="skip the retry storm (clients that retry at once)")  # fmt: skip
    parser.add_argument("--no-hotrow", action="store_true",
                        help="skip the locked-row scenario")  # fmt: skip
    parser.add_argument("--metrics-overhead", action="store_true",
                        help="also run the shop with metrics and the access log off")  # fmt: skip
    parser.add_argument("--via-pgbouncer", action="store_true",
                        help="also run the shop through PgBouncer (transaction mode)")  # fmt: skip
    parser.add_argument("--granian", action="store_true",
                        help="also serve the shop with granian instead of uvicorn")  # fmt: skip
    parser.add_argument("--rounds", type=_whole_number(MAX_ROUNDS), default=1,
                        help="measure each point this many times, servers interleaved; each"
                        f" keeps its median round (default 1, at most {MAX_ROUNDS})")  # fmt: skip
    parser.add_argument("--data-dir", default=str(ROOT / ".pglayer"))
    return parser


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    quick = args.quick
    generator = args.generator
    if generator == "auto":
        generator = "wrk" if wrk_available() else "asyncio"
    plan = Plan(
        quick=quick,
        workers=args.workers or ([1] if quick else [1, 2]),
        concurrency=args.concurrency or ([64] if quick else [64, 256, 1024]),
        duration=args.duration or (2.0 if quick else 10.0),
        warmup=1.0 if quick else 3.0,
        scenarios=args.scenarios,
        servers=args.servers,
        generator=generator,
        overload=not args.no_overload,
        storm=not args.no_storm,
        hotrow=not args.no_hotrow,
        metrics_overhead=args.metrics_overhead,
        via_pgbouncer=args.via_pgbouncer,
        granian=args.granian,
        rounds=args.rounds,
    )
    counts = _counts(quick)
    _stop_on_signals()
    try:
        url, max_id, product, stop = _prepared(quick, Path(args.data_dir))
        try:
            console.print(
                f"generator: {generator}; workers {plan.workers};"
                f" concurrency {plan.concurrency}; {plan.duration:g}s per run"
            )
            rows = run(plan, url, max_id, product)
        finally:
            stop()
    except BaseException:
        if not _stopped_by:
            raise
        # Whatever the signal's unwinding raised (a stopped event loop raises RuntimeError).
        name = signal.Signals(_stopped_by[0]).name
        console.print(f"stopped by {name}: every server stopped, no results written")
        raise SystemExit(128 + _stopped_by[0]) from None
    meta = {
        "plan": asdict(plan),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "wrk": shutil.which("wrk"),
        },
        "dataset": {"users": counts.users, "products": counts.products, "orders": counts.orders},
    }
    report(rows, meta)
