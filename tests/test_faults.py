"""Fault injection on a test-owned cluster: terminated backends, restarts, crashes, shutdowns,
startup while the database is down, and load shedding.

Recovery times are printed (run with `-s` to see them) and bounded generously.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from pglayer_shop.app import create_app
from pglayer_shop.schema import apply_migrations
from pglayer_shop.seed import SeedCounts, seed
from pglayer_shop.settings import ShopSettings

from pglayer import (
    Connection,
    ConnectionLostError,
    Database,
    DatabaseNotAnsweringError,
    DatabaseSettings,
    DatabaseUnavailableError,
    PglayerError,
    QueryTimeoutError,
    deadline,
)
from pglayer._embedded import EmbeddedPostgres
from pglayer._errors import translate
from pglayer.fastapi import Db, health_router, setup
from pglayer.testing import PgBouncer, pgbouncer_binary
from tests.conftest import (
    LiveServer,
    asgi_client,
    backends,
    destroy_cluster,
    make_cluster,
    require_external,
    settings_for,
    wait_for,
)
from tests.test_replicas import frozen

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster() -> Iterator[EmbeddedPostgres]:
    own = make_cluster("pglayer-fault-")
    own.start()
    try:
        yield own
    finally:
        destroy_cluster(own)


@pytest.fixture
def running(cluster: EmbeddedPostgres) -> Iterator[EmbeddedPostgres]:
    """The cluster, started again after a test that stopped it."""
    if cluster.running_port() is None:
        cluster.start()
    yield cluster
    if cluster.running_port() is None:
        cluster.start()


@pytest.fixture
async def shop_url(running: EmbeddedPostgres) -> AsyncIterator[str]:
    name = f"shop_{uuid.uuid4().hex[:8]}"
    running.create_database(name)
    url = running.admin_url(name)
    async with Database(settings_for(url)) as db:
        await apply_migrations(db)
        await seed(db, SeedCounts(users=20, products=2, orders=10))
    yield url
    if running.running_port() is None:  # a test stopped it
        await asyncio.to_thread(running.start)
    admin: asyncpg.Connection[Any] = await asyncpg.connect(running.admin_url())
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def terminate_pool_backends(url: str, database: str) -> int:
    admin: asyncpg.Connection[Any] = await asyncpg.connect(url)
    try:
        return len(
            await admin.fetch(
                """
                SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                WHERE datname = $1 AND application_name = 'pglayer-test'
                """,
                database,
            )
        )
    finally:
        await admin.close()


async def test_terminated_idle_connections_are_replaced_without_a_visible_error(
    running: EmbeddedPostgres, shop_url: str
) -> None:
    database = shop_url.rsplit("/", 1)[1]
    db = Database(settings_for(shop_url, min_size=4, max_size=4))
    app = create_app(db=db, settings=ShopSettings())
    async with app.router.lifespan_context(app), asgi_client(app) as client:
        assert db.stats().size == 4
        killed = await terminate_pool_backends(running.admin_url(), database)
        assert killed == 4
        statuses = [(await client.get(f"/users/{i}")).status_code for i in range(1, 21)]
        assert statuses == [200] * 20
        assert db.stats().connections_lost == 4


async def test_a_fast_restart_under_load_gives_only_503s_and_recovers(
    running: EmbeddedPostgres, shop_url: str
) -> None:
    db = Database(
        settings_for(shop_url, min_size=4, max_size=4, acquire_timeout=1, connect_timeout=1)
    )
    app = create_app(db=db, settings=ShopSettings())
    loop = asyncio.get_running_loop()
    results: list[tuple[float, int, str | None]] = []  # (answered at, status, Retry-After)
    started: list[tuple[float, int]] = []  # (sent at, status)
    stop = asyncio.Event()

    async with app.router.lifespan_context(app), asgi_client(app) as client:

        async def worker(n: int) -> None:
            for i in range(5_000):  # bounded in count as well as by `stop`
                if stop.is_set():
                    return
                sent_at = loop.time()
                response = await client.get(f"/users/{1 + (n + i) % 20}")
                results.append(
                    (loop.time(), response.status_code, response.headers.get("retry-after"))
                )
                started.append((sent_at, response.status_code))
                if response.status_code != 200:
                    await asyncio.sleep(0.01)

        workers = [asyncio.create_task(worker(n)) for n in range(8)]
        await asyncio.sleep(0.3)
        opened_before = db.stats().connections_opened
        restarted_at = loop.time()
        await asyncio.to_thread(running.restart, mode="fast")
        accepting_at = loop.time()

        async def served_after_restart() -> bool:
            return any(t > accepting_at and s == 200 for t, s, _ in results)

        assert await wait_for(served_after_restart, timeout=10)
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*workers)

    counts = Counter(s for _, s, _ in results)
    assert set(counts) <= {200, 503}, counts
    # The restart reached the pool: connections were lost, or requests were refused (a
    # restart quick enough is ridden out by the retries, with no 503 at all).
    assert counts[503] > 0 or db.stats().connections_lost > 0, "the restart was not seen"
    assert all(ra is not None and int(ra) >= 1 for _, s, ra in results if s == 503)
    first_ok = min(t for t, s, _ in results if t > accepting_at and s == 200)
    recovery = first_ok - accepting_at
    print(
        f"\nrestart: outage {accepting_at - restarted_at:.2f}s, first 2xx {recovery * 1000:.0f} ms "
        f"after the server accepted connections; statuses {dict(counts)}"
    )
    assert recovery < 1.0
    assert db.stats().connections_opened > opened_before
    # Every request sent after recovery succeeds: no stale connection was kept.
    tail = [s for t, s in started if t > first_ok]
    assert tail
    assert all(s == 200 for s in tail)


async def test_startup_while_the_database_is_down_then_ready_by_itself(
    running: EmbeddedPostgres, shop_url: str
) -> None:
    running.stop(force=True)
    db = Database(settings_for(shop_url, require_on_startup=False, connect_timeout=0.5))
    app = create_app(db=db, settings=ShopSettings())
    loop = asyncio.get_running_loop()
    async with app.router.lifespan_context(app), asgi_client(app) as client:
        assert (await client.get("/health/live")).status_code == 200
        assert (await client.get("/health/ready")).status_code == 503
        response = await client.get("/users/1")
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"

        await asyncio.to_thread(running.start)
        up_at = loop.time()

        async def ready() -> bool:
            return (await client.get("/health/ready")).status_code == 200

        assert await wait_for(ready, timeout=10, interval=0.05)
        print(f"\nready {(loop.time() - up_at) * 1000:.0f} ms after the database came up")
        assert (await client.get("/users/1")).status_code == 200


async def test_a_required_database_that_is_down_stops_startup_with_a_clear_error(
    running: EmbeddedPostgres, shop_url: str
) -> None:
    running.stop(force=True)
    db = Database(settings_for(shop_url, require_on_startup=True, startup_timeout=0.5))
    app = create_app(db=db, settings=ShopSettings())
    with pytest.raises(DatabaseUnavailableError) as info:
        async with app.router.lifespan_context(app):
            pass
    assert "not reachable within 0.5s" in str(info.value)
    assert running.password not in str(info.value)


async def test_cannot_connect_now_while_shutting_down_is_transient(
    running: EmbeddedPostgres, shop_url: str
) -> None:
    holder: asyncpg.Connection[Any] = await asyncpg.connect(shop_url)
    # A smart shutdown waits for `holder` and refuses new connections meanwhile.
    stopping = running._run("pg_ctl", "stop", "-D", str(running.data_dir), "-m", "smart", "-W")
    assert stopping.returncode == 0
    try:

        async def refused() -> BaseException | None:
            try:
                conn = await asyncpg.connect(shop_url)
            except asyncpg.PostgresError as exc:
                return exc
            await conn.close()
            return None

        exc = await wait_for(refused)
        translated = translate(exc)
        assert isinstance(translated, ConnectionLostError)
        assert translated.sqlstate == "57P03"
    finally:
        await holder.close()
    await asyncio.to_thread(wait_stopped, running)


def wait_stopped(cluster: EmbeddedPostgres) -> None:
    cluster._run("pg_ctl", "stop", "-D", str(cluster.data_dir), "-m", "fast", "-w")


async def test_a_crashed_backend_loses_the_others_with_a_transient_error(
    running: EmbeddedPostgres, shop_url: str
) -> None:
    db = Database(settings_for(shop_url, min_size=1, max_size=2, retry_attempts=1))
    async with db:
        victim: asyncpg.Connection[Any] = await asyncpg.connect(shop_url)
        pid = await victim.fetchval("SELECT pg_backend_pid()")

        async def sleep_in_pool() -> None:
            async with db.connection() as conn:
                await conn.execute("SELECT pg_sleep(10)")

        sleeper = asyncio.create_task(sleep_in_pool())
        await asyncio.sleep(0.2)
        # A backend of our own test cluster, killed by its PID: PostgreSQL then restarts
        # every other backend with 57P02 (crash shutdown).
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(ConnectionLostError) as info:
            await sleeper
        victim.terminate()
        assert info.value.sqlstate in ("57P02", "08003", "08006")

        async def recovered() -> bool:
            try:
                await db.ping(timeout=1)
            except Exception:
                return False
            return True

        assert await wait_for(recovered, timeout=15)


def slow_app(db: Database) -> FastAPI:
    app = FastAPI()
    setup(app, db)

    @app.get("/work")
    async def work(db: Db) -> int:
        return int(await db.run(lambda c: c.fetchval("SELECT 1 FROM pg_sleep(0.02)")))

    return app


async def test_a_pool_of_two_sheds_load_fast_instead_of_queueing(
    running: EmbeddedPostgres, shop_url: str
) -> None:
    database = shop_url.rsplit("/", 1)[1]
    db = Database(
        settings_for(shop_url, min_size=2, max_size=2, max_waiters=16, acquire_timeout=0.5)
    )
    app = slow_app(db)
    async with app.router.lifespan_context(app), LiveServer(app) as server:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=30) as client:
            responses = await asyncio.gather(*(client.get("/work") for _ in range(200)))
    codes = Counter(
        (r.status_code, r.json().get("code") if r.status_code != 200 else "ok") for r in responses
    )
    print(f"\nload shedding, pool of 2, 200 concurrent: {dict(codes)}")
    assert {status for status, _ in codes} <= {200, 503}, codes
    assert codes[(200, "ok")] >= 2
    assert codes[(503, "overloaded")] >= 1
    assert all("retry-after" in r.headers for r in responses if r.status_code == 503)
    assert db.stats().requests_shed == codes[(503, "overloaded")]

    async def clean() -> bool:
        admin: asyncpg.Connection[Any] = await asyncpg.connect(running.admin_url())
        try:
            rows = await backends(admin, database)
        finally:
            await admin.close()
        return not rows  # the pool is closed: nothing may remain

    assert await wait_for(clean)


async def test_while_the_server_is_down_callers_do_not_each_try_to_connect(
    running: EmbeddedPostgres,
) -> None:
    url = running.admin_url("postgres")
    async with Database(settings_for(url, min_size=0, max_size=4, connect_timeout=0.5)) as db:
        assert await db.run(lambda c: c.fetchval("SELECT 1")) == 1
        await asyncio.to_thread(wait_stopped, running)
        outcomes = []
        for _ in range(50):  # a burst of requests, each of which would connect
            try:
                await db.run(lambda c: c.fetchval("SELECT 1"), retry=False)
            except (ConnectionLostError, DatabaseUnavailableError) as exc:
                outcomes.append(type(exc).__name__)
        tried = db.stats().connections_failed
    assert len(outcomes) == 50  # every one a 503, at once
    # A connect refused is the server unavailable, not a connection lost (the metrics and
    # the retry reasons would point the operator at the network).
    assert set(outcomes) == {"DatabaseUnavailableError"}, outcomes
    # The first tries and fails; the rest, within its cool-down, do not try again.
    assert 1 <= tried <= 3, tried


async def test_behind_a_pooler_a_server_that_is_down_counts_as_failed_connects(
    running: EmbeddedPostgres,
) -> None:
    # PgBouncer lets clients log in from the server parameters it keeps, then refuses
    # their first statement. Counted as opened and lost, that was ~800 connects a second
    # under load, and the alert on failed connects never fired.
    require_external(pgbouncer_binary() is not None, "pgbouncer is not installed")
    server = running.admin_url()
    with PgBouncer(server, pool_mode="transaction", pool_size=2, server_login_retry=1) as bouncer:
        settings = settings_for(bouncer.url("postgres"), max_size=4, query_timeout=1.0)
        async with Database(settings) as db:
            await db.run(lambda c: c.fetchval("SELECT 1"))
            await asyncio.to_thread(wait_stopped, running)
            before = db.stats()
            loop = asyncio.get_running_loop()
            stop = loop.time() + 2.0
            errors: Counter[str] = Counter()

            async def work(lock_timeout: float | None) -> None:
                while loop.time() < stop and sum(errors.values()) < 5000:
                    with pytest.raises(PglayerError) as caught:
                        await db.run(lambda c: c.fetchval("SELECT 1"), lock_timeout=lock_timeout)
                    errors[type(caught.value).__name__] += 1
                    await asyncio.sleep(0.002)

            # Reads, and writes with a lock bound (the shop's orders), which PgBouncer refused
            # too: never given a server, not "outcome unknown".
            await asyncio.gather(*(work(None if i % 2 else 1.0) for i in range(16)))
            after = db.stats()
            await asyncio.to_thread(running.start)

            async def serves() -> bool:
                with contextlib.suppress(PglayerError):
                    return bool(await db.run(lambda c: c.fetchval("SELECT 1")) == 1)
                return False

            assert await wait_for(serves, timeout=10)
    assert after.connections_failed > before.connections_failed, errors
    opened = after.connections_opened - before.connections_opened
    print(f"\nbehind a pooler, server down, 2 s: {opened} opened, {dict(errors)}")
    assert opened <= 20, (opened, errors)
    # Each is told at once, not left waiting for a connection stuck in the pooler's queue.
    assert "PoolTimeoutError" not in errors, errors
    assert "CommitIndeterminateError" not in errors, errors


async def test_a_rollback_the_server_does_not_answer_ends_soon_after_the_deadline(
    running: EmbeddedPostgres,
) -> None:
    frozen: list[int] = []

    async def on_a_frozen_backend(db: Database) -> None:
        async with db.transaction() as conn:
            frozen.append(await conn.fetchval("SELECT pg_backend_pid()"))
            os.kill(frozen[0], signal.SIGSTOP)  # a backend of the test's own cluster
            await conn.execute("SELECT 1")  # then ROLLBACK, which it will not answer either

    settings = settings_for(running.admin_url("postgres"), query_timeout=10.0)
    async with Database(settings) as db:
        started = time.monotonic()
        try:
            with deadline(0.5), pytest.raises(QueryTimeoutError):
                await on_a_frozen_backend(db)
        finally:
            for pid in frozen:
                os.kill(pid, signal.SIGCONT)
        # The deadline, then a second for the ROLLBACK: not its 10 s query deadline.
        assert time.monotonic() - started < 4


async def test_deadlines_past_statement_timeout_on_a_silent_server_are_not_answering(
    running: EmbeddedPostgres,
) -> None:
    # Two statements in flight when the server stops, sent before its last answer.
    settings = settings_for(
        running.admin_url("postgres"), min_size=3, query_timeout=1.0, statement_timeout=0.5
    )

    def sleep(seconds: float) -> Any:
        return db.run(lambda c: c.fetchval("SELECT pg_sleep($1)", seconds), retry=False)

    async with Database(settings) as db:
        await asyncio.gather(*(sleep(0) for _ in range(3)))  # three connections open
        in_flight = [asyncio.create_task(sleep(0.4)) for _ in range(2)]
        await sleep(0.1)  # the last answer
        with frozen(running):
            errors = await asyncio.gather(*in_flight, return_exceptions=True)
    assert all(isinstance(e, DatabaseNotAnsweringError) for e in errors), errors


async def test_a_statement_alone_on_a_silent_server_is_not_answering(
    running: EmbeddedPostgres,
) -> None:
    # Nothing else in flight to tell a stopped server from a slow statement: a connect to
    # the server, which a live one answers even at its limits, tells it.
    settings = settings_for(
        running.admin_url("postgres"), min_size=1, query_timeout=1.0, statement_timeout=0.5
    )
    async with Database(settings) as db:
        await db.run(lambda c: c.fetchval("SELECT 1"))
        with frozen(running), pytest.raises(QueryTimeoutError) as raised:
            await db.run(lambda c: c.fetchval("SELECT 1"), retry=False)
    assert type(raised.value) is DatabaseNotAnsweringError


async def test_a_statement_alone_past_a_bound_it_lifted_itself_is_a_timeout(
    running: EmbeddedPostgres,
) -> None:
    # Nothing else answered while it ran, but nothing else waited either: a long report
    # whose transaction lifted statement_timeout, not a silent server.
    settings = settings_for(running.admin_url("postgres"), query_timeout=1.0, statement_timeout=0.5)

    async def report(conn: Connection) -> None:
        await conn.execute("SET LOCAL statement_timeout = 0")
        await conn.execute("SELECT pg_sleep(3)")

    async with Database(settings) as db:
        with pytest.raises(QueryTimeoutError) as raised:
            await db.run_in_transaction(report, retry=False)
    assert type(raised.value) is QueryTimeoutError


async def test_a_deadline_past_statement_timeout_while_the_server_answers_is_a_timeout(
    running: EmbeddedPostgres,
) -> None:
    settings = settings_for(running.admin_url("postgres"), query_timeout=1.0, statement_timeout=0.5)
    stuck: list[int] = []

    async def on_a_stopped_backend(conn: Connection) -> None:
        stuck.append(await conn.fetchval("SELECT pg_backend_pid()"))
        os.kill(stuck[0], signal.SIGSTOP)  # a backend of the test's own cluster
        await conn.fetchval("SELECT 1")

    async def others_answered() -> None:
        while True:
            await db.run(lambda c: c.fetchval("SELECT 1"))
            await asyncio.sleep(0.05)

    async with Database(settings) as db:
        answering = asyncio.create_task(others_answered())
        try:
            with pytest.raises(QueryTimeoutError) as raised:
                await db.run(on_a_stopped_backend)
        finally:
            answering.cancel()
            for pid in stuck:
                os.kill(pid, signal.SIGCONT)
            # Ended before the pool closes: cancelled mid-query, its connection is given back
            # (and ended) now, not found unclosed by a later test's garbage collection.
            await asyncio.gather(answering, return_exceptions=True)
        assert type(raised.value) is QueryTimeoutError


async def test_a_refill_the_server_refuses_logs_why(
    db_url: str, db_name: str, admin: asyncpg.Connection[Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pglayer")
    async with Database(settings_for(db_url, min_size=2, max_size=2)) as db:
        await admin.execute(f'ALTER DATABASE "{db_name}" ALLOW_CONNECTIONS false')
        try:
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                db_name,
            )

            def said() -> list[str]:
                return [r.getMessage() for r in caplog.records if "refill failed" in r.getMessage()]

            async def refused() -> bool:
                return bool(said()) and db.stats().size < 2

            assert await wait_for(refused, timeout=10)
            assert "refused the connection: database " in said()[0], said()
            assert "is not currently accepting connections (SQLSTATE 55000)" in said()[0]
            assert "@127.0.0.1:" in said()[0]  # where it connects, masked
        finally:
            await admin.execute(f'ALTER DATABASE "{db_name}" ALLOW_CONNECTIONS true')


async def test_a_server_that_does_not_answer_at_startup_is_retried_not_refused() -> None:
    with socket.socket() as silent:  # accepts connections (the kernel does), answers nothing
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"postgresql://postgres@127.0.0.1:{silent.getsockname()[1]}/app"
        db = Database(settings_for(url, require_on_startup=False, connect_timeout=0.5))
        await db.open()  # not a configuration error: it may answer later
        try:
            with pytest.raises(DatabaseUnavailableError):
                await db.run(lambda c: c.fetchval("SELECT 1"), retry=False)
        finally:
            await db.close()


def test_one_off_commands_open_no_replica(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://app@127.0.0.1:1/app")
    monkeypatch.setenv("PGLAYER_REPLICA_URLS", "postgresql://app@127.0.0.1:2/app")
    assert DatabaseSettings.for_command().replica_urls == []


async def test_behind_a_pooler_whose_server_just_went_opening_ends_with_its_deadline(
    running: EmbeddedPostgres,
) -> None:
    # PgBouncer logs clients in and queues their statements: the pooler probes at open
    # waited in that queue (120 s by default), past any startup deadline.
    require_external(pgbouncer_binary() is not None, "pgbouncer is not installed")
    with PgBouncer(running.admin_url(), pool_mode="transaction", pool_size=2,
                   server_login_retry=2) as bouncer:  # fmt: skip
        url = bouncer.url("postgres")
        async with Database(settings_for(url)) as db:
            await db.run(lambda c: c.fetchval("SELECT 1"))  # PgBouncer keeps a server
        await asyncio.to_thread(wait_stopped, running)
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailableError, match=r"not reachable within 1\.5s"):
            async with Database(settings_for(url, startup_timeout=1.5)):
                pass
        assert time.monotonic() - started < 4  # not the probes' 5 s connect timeouts, nor 120


async def test_ready_says_down_of_a_server_that_hangs_not_saturated(
    running: EmbeddedPostgres,
) -> None:
    # Its probes' connections come back to be checked, and its connects never answer: the
    # pool then has free slots but gives none, which is the database, not the load.
    settings = settings_for(running.admin_url("postgres"), min_size=1, max_size=4)
    db = Database(settings)
    app = FastAPI()
    setup(app, db)
    app.include_router(health_router(ready_timeout=0.3))
    postmaster = int((running.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
    async with app.router.lifespan_context(app), asgi_client(app) as client:
        backends_ = [int(b["pid"]) for b in await backends_of(running)]
        frozen = [postmaster, *backends_]
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)  # the test's own cluster
        try:
            said = [(await client.get("/health/ready")).json()["pools"]["primary"]
                    for _ in range(5)]  # fmt: skip
        finally:
            for pid in frozen:
                os.kill(pid, signal.SIGCONT)
    assert said == ["down"] * 5, said


async def backends_of(cluster: EmbeddedPostgres) -> list[Any]:
    conn: asyncpg.Connection[Any] = await asyncpg.connect(cluster.admin_url("postgres"))
    try:
        return list(
            await conn.fetch(
                "SELECT pid FROM pg_stat_activity WHERE pid <> pg_backend_pid()"
                " AND backend_type = 'client backend'"
            )
        )
    finally:
        await conn.close()
