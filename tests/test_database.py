"""`Database` against a real server: lifecycle, deadlines, per-connection setup, typed rows."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
from pydantic import BaseModel

from pglayer import (
    ConfigurationError,
    Connection,
    Database,
    DatabaseError,
    DatabaseUnavailableError,
    InvalidInputError,
    PoolOverloadedError,
    PoolTimeoutError,
    QueryTimeoutError,
    TransactionEndedError,
    TransientError,
)
from tests.conftest import Server, backends, free_port, settings_for, wait_for
from tests.test_pool_faults import two_connections_allowed


class Row(BaseModel):
    id: int
    label: str
    at: datetime


async def test_fetch_all_and_fetch_one_return_models(db: Database) -> None:
    async with db.connection() as conn:
        rows = await conn.fetch_all(
            Row,
            "SELECT g AS id, 'row ' || g AS label, now() AS at FROM generate_series(1, 3) g",
        )
        missing = await conn.fetch_one(Row, "SELECT 1 AS id, 'x' AS label, now() AS at WHERE false")
    assert [r.id for r in rows] == [1, 2, 3]
    assert rows[0].label == "row 1"
    assert missing is None


async def test_connections_carry_server_side_defaults(db_url: str) -> None:
    settings = settings_for(
        db_url, statement_timeout=3.0, idle_in_transaction_timeout=7.0, lock_timeout=1.5
    )
    async with Database(settings) as db, db.connection() as conn:
        values = await conn.fetchrow(
            """
            SELECT current_setting('application_name') AS app,
                   current_setting('statement_timeout') AS st,
                   current_setting('idle_in_transaction_session_timeout') AS idle,
                   current_setting('lock_timeout') AS lock,
                   current_setting('jit') AS jit
            """
        )
    assert values is not None
    assert dict(values) == {
        "app": "pglayer-test",
        "st": "3s",
        "idle": "7s",
        "lock": "1500ms",
        "jit": "off",  # the server's default is on
    }


async def test_jit_stays_on_where_the_app_asks_for_it(db_url: str) -> None:
    async with Database(settings_for(db_url, jit=True)) as db, db.connection() as conn:
        assert await conn.fetchval("SELECT current_setting('jit')") == "on"


async def test_json_and_jsonb_decode_to_python(db: Database) -> None:
    async with db.connection() as conn:
        value = await conn.fetchval("SELECT $1::jsonb", {"a": [1, "é"]})
        plain = await conn.fetchval("""SELECT '{"b": null}'::json""")
    assert value == {"a": [1, "é"]}
    assert plain == {"b": None}


async def test_copy_loads_json_and_jsonb_columns(db: Database) -> None:
    # The text codec made every COPY of a json column fail ("no binary format encoder"),
    # taken for a lost connection: retried, then 503 `unavailable`.
    async with db.connection() as conn:
        await conn.execute("CREATE TABLE docs (j json, b jsonb)")
        rows = [({"i": i}, {"n": [i, "é"]}) for i in range(3)]
        await conn.copy_records("docs", rows, columns=["j", "b"])
        got = await conn.fetch("SELECT j, b FROM docs ORDER BY b->'n'->0")
    assert [tuple(row) for row in got] == rows


async def test_jsonb_numbers_come_back_as_exact_as_postgresql_keeps_them(db: Database) -> None:
    # 2^64 came back as 1.8446744073709552e+19; 1e400 was a JSONDecodeError (a 500).
    async with db.connection() as conn:
        big = await conn.fetchval("""SELECT '{"n": 18446744073709551616}'::jsonb""")
        huge = await conn.fetchval("SELECT '1e400'::jsonb")
        money = await conn.fetchval("SELECT $1::jsonb", {"d": Decimal("1.10")})
    assert big == {"n": 18446744073709551616}
    assert huge == 10**400  # PostgreSQL writes it out in full
    assert money == {"d": "1.10"}  # as pglayer's responses write a Decimal


async def test_jsonb_integers_past_64_bits_go_back_in_exact(db: Database) -> None:
    # Read exact, then refused on the way back in ("Integer exceeds 64-bit range").
    value = {"n": 2**70, "m": -(2**64)}
    async with db.connection() as conn:
        assert await conn.fetchval("SELECT $1::jsonb", value) == value
        await conn.execute("CREATE TABLE big (b jsonb)")
        await conn.copy_records("big", [(value,)], columns=["b"])
        assert await conn.fetchval("SELECT b FROM big") == value


@pytest.mark.parametrize("value", [float("nan"), {"x": float("inf")}, [1.0, -float("inf")]])
async def test_a_float_json_cannot_hold_is_refused_not_stored_as_null(
    db: Database, value: object
) -> None:
    # orjson writes NaN and infinity as null: stored, silently, as JSON null.
    async with db.connection() as conn:
        with pytest.raises(InvalidInputError):
            await conn.fetchval("SELECT $1::jsonb", value)


async def test_per_call_timeout_cancels_the_query_and_keeps_the_connection(
    db: Database, admin: asyncpg.Connection[Any], db_name: str
) -> None:
    async with db.connection() as conn:
        with pytest.raises(QueryTimeoutError) as info:
            await conn.execute("SELECT pg_sleep(30)", timeout=0.2)
        assert isinstance(info.value.__cause__, TimeoutError)
        assert await conn.fetchval("SELECT 1") == 1

    async def no_sleepers() -> bool:
        return not any(
            "pg_sleep" in (b["query"] or "") and b["state"] == "active"
            for b in await backends(admin, db_name)
        )

    assert await wait_for(no_sleepers)


async def test_statement_timeout_is_a_query_timeout_with_its_sqlstate(db_url: str) -> None:
    async with Database(settings_for(db_url, statement_timeout=0.1)) as db, db.connection() as conn:
        with pytest.raises(QueryTimeoutError) as info:
            await conn.execute("SELECT pg_sleep(5)")
    assert info.value.sqlstate == "57014"


async def test_acquire_waits_at_most_its_deadline(db_url: str) -> None:
    async with Database(settings_for(db_url, min_size=1, max_size=1)) as db:
        async with db.connection():
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(PoolTimeoutError):
                async with db.connection(timeout=0.2):
                    pass
            assert loop.time() - started < 2.0
        assert db.stats().acquire_timeouts == 1


async def test_a_waiter_past_its_deadline_gets_no_connection_freed_before_the_tick(
    db_url: str,
) -> None:
    # Lent anyway, it was served after the bound it was promised (5,003-5,110 ms with 5 s).
    async with Database(settings_for(db_url, min_size=1, max_size=1)) as db:

        async def hold() -> None:
            async with db.connection():
                await asyncio.sleep(0.05)  # the waiter queues
                time.sleep(0.2)  # noqa: ASYNC251 -- its deadline passes; the loop and its tick wait

        holder = asyncio.create_task(hold())
        await asyncio.sleep(0.01)
        with pytest.raises(PoolTimeoutError):
            async with db.connection(timeout=0.1):
                pass
        await holder
        assert db.stats().acquisitions == 1  # the holder's only


async def test_a_wait_that_timed_out_is_in_the_acquire_wait_histogram(db_url: str) -> None:
    async with Database(settings_for(db_url, min_size=1, max_size=1)) as db:
        async with db.connection():
            with pytest.raises(PoolTimeoutError):
                async with db.connection(timeout=0.25):
                    pass
        stats = db.stats()
    assert stats.acquire_wait.count == stats.acquisitions + 1
    # At its deadline: 0.25 is a bucket's bound, and the wait is in that bucket, not above.
    assert stats.acquire_wait.counts[stats.acquire_wait.bounds.index(0.25)] == 1


async def test_waiters_beyond_the_bound_are_shed_at_once(db_url: str) -> None:
    async with Database(settings_for(db_url, min_size=1, max_size=1, max_waiters=2)) as db:
        async with db.connection():

            async def wait_in_line() -> None:
                async with db.connection(timeout=5):
                    pass

            waiters = [asyncio.create_task(wait_in_line()) for _ in range(2)]
            await asyncio.sleep(0.05)
            with pytest.raises(PoolOverloadedError):
                async with db.connection(timeout=5):
                    pass
        await asyncio.gather(*waiters)
        assert db.stats().requests_shed == 1


async def test_open_gives_up_after_startup_timeout_and_names_the_masked_target() -> None:
    port = free_port()
    url = f"postgresql://app:hunter2@127.0.0.1:{port}/shop"
    db = Database(settings_for(url, startup_timeout=1.0, connect_timeout=0.2))
    started = time.monotonic()
    with pytest.raises(DatabaseUnavailableError) as info:
        await db.open(wait=True)
    assert time.monotonic() - started < 1.0  # no backoff that ends past the timeout
    message = str(info.value)
    assert f"app@127.0.0.1:{port}/shop" in message
    assert "hunter2" not in message
    assert not db.is_open


async def test_open_without_wait_fails_fast_then_serves_transient_errors() -> None:
    url = f"postgresql://app:pw@127.0.0.1:{free_port()}/shop"
    db = Database(settings_for(url, require_on_startup=False, connect_timeout=0.2))
    await db.open()
    try:
        with pytest.raises(DatabaseUnavailableError):
            async with db.connection():
                pass
    finally:
        await db.close()


async def test_connects_failing_while_the_app_starts_are_counted_as_failed_connections() -> None:
    # The alerts on an unreachable database read this counter: an app started while its
    # server is down retries in the background, and those failures must show.
    url = f"postgresql://app:pw@127.0.0.1:{free_port()}/shop"
    db = Database(settings_for(url, require_on_startup=False, connect_timeout=0.2))
    await db.open()
    try:

        async def failing() -> bool:
            return db.stats().connections_failed >= 2

        assert await wait_for(failing, timeout=10)
    finally:
        await db.close()


@contextlib.asynccontextmanager
async def refusing_connections(
    db: Database, admin: asyncpg.Connection[Any], db_name: str
) -> AsyncIterator[None]:
    """The test's database closed to new connections, and `db`'s own ended."""
    await admin.execute(f'ALTER DATABASE "{db_name}" ALLOW_CONNECTIONS false')
    try:
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", db_name
        )
        assert await wait_for(lambda: asyncio.sleep(0, db.stats().size == 0))
        yield
    finally:
        await admin.execute(f'ALTER DATABASE "{db_name}" ALLOW_CONNECTIONS true')


async def test_clients_of_a_server_that_refuses_do_not_make_a_connect_each(
    db_url: str, db_name: str, admin: asyncpg.Connection[Any]
) -> None:
    settings = settings_for(db_url, min_size=0, max_size=4, acquire_timeout=5)
    async with Database(settings) as db:
        assert await db.run(lambda c: c.fetchval("SELECT 1")) == 1
        async with refusing_connections(db, admin, db_name):

            async def one() -> BaseException | None:
                try:
                    async with db.connection():
                        return None
                except Exception as exc:
                    return exc

            started = time.monotonic()
            results = await asyncio.gather(*(one() for _ in range(100)))
            took = time.monotonic() - started
            tried = db.stats().connections_failed
    assert all(isinstance(r, DatabaseUnavailableError) for r in results), results
    assert took < 2.5  # each told at once, not after its 5 s acquire deadline
    # One wave of connects (the pool's four), not one or more per client.
    assert tried <= 4, tried


async def test_a_long_outage_still_answers_unavailable(
    db_url: str, db_name: str, admin: asyncpg.Connection[Any]
) -> None:
    async with (
        Database(settings_for(db_url, min_size=0)) as db,
        refusing_connections(db, admin, db_name),
    ):
        pool = db._pool
        assert pool is not None
        pool._connect_failures = 5000  # as after a long outage under load
        with pytest.raises(DatabaseUnavailableError):  # its cool-down overflowed a float
            async with db.connection():
                pass


async def test_close_waits_for_in_flight_work(db_url: str) -> None:
    db = Database(settings_for(db_url))
    await db.open()

    async def work() -> int:
        async with db.connection() as conn:
            await conn.execute("SELECT pg_sleep(0.3)")
            return 1

    task = asyncio.create_task(work())
    await asyncio.sleep(0.05)
    await db.close(timeout=5)
    assert await task == 1


async def test_close_terminates_stragglers_after_its_timeout(
    db_url: str, admin: asyncpg.Connection[Any], db_name: str
) -> None:
    db = Database(settings_for(db_url))
    await db.open()
    started = asyncio.Event()

    async def straggler() -> None:
        async with db.connection() as conn:
            started.set()
            await conn.execute("SELECT pg_sleep(30)", timeout=60)

    task = asyncio.create_task(straggler())
    await started.wait()
    await asyncio.sleep(0.05)
    loop = asyncio.get_running_loop()
    before = loop.time()
    await db.close(timeout=0.3)
    assert loop.time() - before < 3
    with pytest.raises(Exception):  # noqa: B017,PT011  the straggler's connection was cut
        await task

    async def none_left() -> bool:
        return not await backends(admin, db_name)

    assert await wait_for(none_left)


async def test_acquire_after_close_is_transient(db_url: str) -> None:
    db = Database(settings_for(db_url))
    await db.open()
    await db.close()
    with pytest.raises(DatabaseUnavailableError):
        async with db.connection():
            pass


async def test_open_refuses_a_pool_budget_beyond_max_connections(db_url: str) -> None:
    settings = settings_for(db_url, workers=500, on_budget_exceeded="refuse")
    db = Database(settings)
    with pytest.raises(ConfigurationError, match=r"500 worker\(s\) x max_size 4"):
        await db.open()
    assert not db.is_open


async def test_open_warns_about_a_pool_budget_beyond_max_connections(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with Database(settings_for(db_url, workers=500)) as db:
        assert db.is_open
    assert any("connection budget exceeded" in r.getMessage() for r in caplog.records)
    caplog.clear()
    async with Database(settings_for(db_url, workers=2)):
        pass
    assert not any("connection budget" in r.getMessage() for r in caplog.records)


async def test_open_refuses_a_pool_budget_beyond_the_roles_connection_limit(
    server: Server, admin: asyncpg.Connection[Any], db_name: str
) -> None:
    async with two_connections_allowed(server, admin, db_name) as url:
        settings = settings_for(url, workers=2, max_size=2, on_budget_exceeded="refuse")
        with pytest.raises(ConfigurationError, match="the role's CONNECTION LIMIT 2"):
            async with Database(settings):
                pass


async def test_the_reserve_is_not_charged_to_a_roles_connection_limit(
    server: Server, admin: asyncpg.Connection[Any], db_name: str
) -> None:
    # The reserve keeps server slots free for an admin, who need not be this role.
    async with two_connections_allowed(server, admin, db_name) as url:
        settings = settings_for(url, workers=2, max_size=1, on_budget_exceeded="refuse")
        async with Database(settings) as db:
            assert db.is_open


async def test_open_refuses_a_pool_budget_beyond_the_databases_connection_limit(
    server: Server, admin: asyncpg.Connection[Any], db_name: str
) -> None:
    role = f"r_{uuid.uuid4().hex[:12]}"  # not a superuser, whom PostgreSQL does not limit
    await admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw'")
    await admin.execute(f'ALTER DATABASE "{db_name}" CONNECTION LIMIT 3')
    try:
        parts = urlsplit(server.admin_url)
        url = f"postgresql://{role}:pw@{parts.hostname}:{parts.port}/{db_name}"
        settings = settings_for(
            url, workers=2, max_size=2, connection_reserve=0, on_budget_exceeded="refuse"
        )
        with pytest.raises(ConfigurationError, match="the database's CONNECTION LIMIT 3"):
            async with Database(settings):
                pass
    finally:
        await admin.execute(f'ALTER DATABASE "{db_name}" CONNECTION LIMIT -1')
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role
        )
        await admin.execute(f"DROP ROLE {role}")


async def test_a_transaction_cancelled_mid_query_leaves_its_connection_fit_for_the_next(
    db_url: str,
) -> None:
    # One connection: the next transaction gets the very one whose task was cancelled.
    async with Database(settings_for(db_url, min_size=1, max_size=1)) as db:
        started = asyncio.Event()

        async def slow(conn: Connection) -> None:
            started.set()
            await conn.execute("SELECT pg_sleep(5)")

        task = asyncio.create_task(db.run_in_transaction(slow))
        await started.wait()
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(3):
            assert await db.run_in_transaction(lambda c: c.fetchval("SELECT 1")) == 1
            async with db.transaction() as conn:
                assert await conn.fetchval("SELECT 2") == 2


@pytest.mark.parametrize("way", ["connection", "run"])
async def test_a_statement_cancelled_between_parse_and_bind_does_not_hold_its_backend(
    db_url: str, admin: asyncpg.Connection[Any], way: str
) -> None:
    # Without a statement cache (as behind PgBouncer) every query is Parse, then Bind; a
    # cancellation in between leaves the server in the statement until a Sync or a query.
    async with Database(settings_for(db_url, min_size=1, max_size=1, statement_cache_size=0)) as db:

        async def parse_then_cancel(conn: Connection) -> None:
            raw: Any = conn.raw  # asyncpg's private step: Parse and Describe, no Sync
            await raw._get_statement("SELECT $1::int + 1", None)
            raise asyncio.CancelledError

        async def through_the_pool() -> None:
            if way == "run":
                await db.run(parse_then_cancel, retry=False)
            else:
                async with db.connection() as conn:
                    await parse_then_cancel(conn)

        with pytest.raises(asyncio.CancelledError):
            await through_the_pool()

        async def idle() -> bool:
            states = await admin.fetch(
                "SELECT state FROM pg_stat_activity WHERE datname = $1",
                db_url.rsplit("/", 1)[1].split("?")[0],
            )
            return [r["state"] for r in states] == ["idle"]

        assert await wait_for(idle, timeout=5, interval=0.05)
        assert await db.read(lambda conn: conn.fetchval("SELECT 41 + 1")) == 42


async def test_reads_read_only_refuses_a_write_through_a_read_as_a_replica_would(
    db_url: str,
) -> None:
    async with Database(settings_for(db_url, reads_read_only=True)) as db:
        assert await db.read(lambda c: c.fetchval("SELECT 1")) == 1
        with pytest.raises(DatabaseError) as through_read:
            await db.read(lambda c: c.execute("CREATE TABLE written (id int)"))
        with pytest.raises(DatabaseError) as through_connection:
            async with db.read_connection() as conn:
                await conn.execute("CREATE TABLE written (id int)")
        await db.run(lambda c: c.execute("CREATE TABLE written (id int)"))  # writes still write
    assert through_read.value.sqlstate == through_connection.value.sqlstate == "25006"
    assert "through db.read" in str(through_read.value)  # what to look for, not "database error"


@pytest.mark.parametrize("statement", ["COMMIT", "ROLLBACK", "COMMIT; BEGIN; ROLLBACK"])
@pytest.mark.parametrize("nested", [False, True])
async def test_a_transaction_its_block_ended_is_an_error_not_a_commit(
    db: Database, statement: str, nested: bool
) -> None:
    async def end_it(conn: Connection) -> None:
        async with conn.transaction():
            if nested:
                async with conn.transaction():
                    await conn.execute(statement)
            else:
                await conn.execute(statement)

    async with db.connection() as conn:
        with pytest.raises(TransactionEndedError, match="COMMIT or ROLLBACK"):
            await end_it(conn)


async def test_a_transaction_its_block_ended_raises_that_even_on_the_way_out_of_an_error(
    db: Database,
) -> None:
    async def end_it_then_fail() -> None:
        async with db.transaction() as conn:
            await conn.execute("COMMIT")
            raise ValueError("the handler's own error")

    with pytest.raises(TransactionEndedError) as raised:
        await end_it_then_fail()
    assert isinstance(raised.value.__cause__, ValueError)
    async with db.connection() as conn:  # the connection went back fit for use
        assert await conn.fetchval("SELECT 1") == 1


async def test_a_connection_whose_block_ended_its_transaction_is_not_lent_again(
    db_url: str,
) -> None:
    # After its own COMMIT a block's SET is the session's, not the transaction's.
    async def end_then_set(db: Database) -> None:
        async with db.transaction() as conn:
            await conn.execute("COMMIT")
            await conn.execute("SET statement_timeout = 1")

    async with Database(settings_for(db_url, min_size=1, max_size=1)) as db:
        with pytest.raises(TransactionEndedError):
            await end_then_set(db)
        async with db.connection() as conn:
            assert await conn.fetchval("SHOW statement_timeout") != "1ms"


async def _begin_and_insert(conn: Connection) -> None:
    await conn.execute("BEGIN")
    await conn.execute("INSERT INTO products (name, price, stock) VALUES ('ghost', 1, 1)")


async def _ghosts(db: Database) -> int:
    return int(
        await db.run(lambda c: c.fetchval("SELECT count(*) FROM products WHERE name = 'ghost'"))
    )


async def test_a_transaction_db_run_began_and_left_open_is_an_error_not_a_success(
    db: Database,
) -> None:
    with pytest.raises(TransactionEndedError, match="left it open"):
        await db.run(_begin_and_insert)
    assert await _ghosts(db) == 0


async def test_a_transaction_a_lent_connection_began_and_left_open_is_an_error(
    db: Database,
) -> None:
    with pytest.raises(TransactionEndedError, match="left it open"):
        async with db.connection() as conn:
            await _begin_and_insert(conn)
    assert await _ghosts(db) == 0


async def test_a_transaction_left_open_after_a_caught_driver_error_is_still_an_error(
    db: Database,
) -> None:
    async def begin_insert_and_swallow(conn: Connection) -> None:
        await _begin_and_insert(conn)
        with contextlib.suppress(InvalidInputError):  # refused by the driver, not the server
            await conn.fetchval("SELECT $1::int", "not an int")

    with pytest.raises(TransactionEndedError, match="left it open"):
        await db.run(begin_insert_and_swallow)
    assert await _ghosts(db) == 0


async def test_a_block_that_begins_and_commits_its_own_transaction_succeeds(db: Database) -> None:
    async def begin_and_commit(conn: Connection) -> None:
        await _begin_and_insert(conn)
        await conn.execute("COMMIT")

    await db.run(begin_and_commit)
    assert await _ghosts(db) == 1


@pytest.mark.parametrize("statement", ["DISCARD ALL", "DEALLOCATE ALL"])
async def test_statements_cached_before_a_discard_still_run_on_that_connection(
    db_url: str, statement: str
) -> None:
    async with Database(settings_for(db_url, min_size=1, max_size=1)) as db:
        assert await db.run(lambda c: c.fetchval("SELECT 41 + $1::int", 1)) == 42  # cached
        await db.run(lambda c: c.execute(statement))
        assert await db.run(lambda c: c.fetchval("SELECT 41 + $1::int", 1)) == 42


async def test_a_transaction_whose_cached_statements_were_dropped_is_replayed(
    db_url: str,
) -> None:
    # Inside a transaction the missing statement (26000) aborted it, so it cannot simply run
    # again as in autocommit; the transaction can, with the cache dropped (as after a
    # pooler's mode changed under the app), instead of a 500.
    attempts = 0

    async def work(conn: Connection) -> int:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            await conn.execute("DEALLOCATE ALL")
        value: int = await conn.fetchval("SELECT 41 + $1::int", 1)
        return value

    async with Database(settings_for(db_url, min_size=1, max_size=1)) as db:
        assert await db.run(lambda c: c.fetchval("SELECT 41 + $1::int", 1)) == 42  # cached
        assert await db.run_in_transaction(work) == 42
    assert attempts == 2


async def test_a_transaction_block_whose_cached_statements_were_dropped_says_retry(
    db_url: str,
) -> None:
    async with Database(settings_for(db_url, min_size=1, max_size=1)) as db:
        assert await db.run(lambda c: c.fetchval("SELECT 41 + $1::int", 1)) == 42  # cached

        async def block() -> None:
            async with db.transaction() as conn:
                await conn.execute("DEALLOCATE ALL")
                await conn.fetchval("SELECT 41 + $1::int", 1)

        with pytest.raises(TransientError) as caught:
            await block()
        assert caught.value.sqlstate == "26000"
        assert await db.run(lambda c: c.fetchval("SELECT 41 + $1::int", 1)) == 42


async def test_a_url_of_several_hosts_opens_on_the_one_that_answers(db_url: str) -> None:
    # libpq's host1:port1,host2:port2 form: the pooler check read one port from it and raised.
    base, _, rest = db_url.partition("@")
    url = f"{base}@127.0.0.1:{free_port()},{rest}"
    async with Database(settings_for(url)) as db:
        assert db.pooler is not None
        assert db.pooler.mode == "none"
        assert await db.run(lambda c: c.fetchval("SELECT 1")) == 1


async def test_opening_waits_out_a_database_closed_to_connections(
    db_url: str, db_name: str, admin: asyncpg.Connection[Any]
) -> None:
    # 55000 (`ALLOW_CONNECTIONS false`, a maintenance window) ended a restart at once: the
    # new instance exited where one whose server was not listening waited for it.
    db = Database(settings_for(db_url, startup_timeout=20))
    await admin.execute(f'ALTER DATABASE "{db_name}" ALLOW_CONNECTIONS false')
    try:
        opening = asyncio.create_task(db.open())
        await asyncio.sleep(1.0)
        assert not opening.done()
    finally:
        await admin.execute(f'ALTER DATABASE "{db_name}" ALLOW_CONNECTIONS true')
    await asyncio.wait_for(opening, 20)
    try:
        assert await db.run(lambda c: c.fetchval("SELECT 1")) == 1
    finally:
        await db.close()


async def test_a_pool_that_keeps_failing_to_open_says_so_again_while_it_retries(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Said once at startup, an outage of hours was silent after while requests were 503s.
    monkeypatch.setattr("pglayer._database.STILL_DOWN_EVERY", 0.3)
    url = f"postgresql://app:pw@127.0.0.1:{free_port()}/shop"
    db = Database(settings_for(url, require_on_startup=False, connect_timeout=0.2))
    await db.open()
    try:

        async def said_twice() -> bool:
            return len(still_down(caplog)) >= 2

        assert await wait_for(said_twice, timeout=10)
    finally:
        await db.close()
    [first, *_] = still_down(caplog)
    assert "connection refused" in first, first
    assert "requests are answered 503" in first, first


def still_down(caplog: pytest.LogCaptureFixture) -> list[str]:
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    return [line for line in said if "still not reachable after" in line]
