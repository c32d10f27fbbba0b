"""The pool and its connections under faults and misuse: lost connections mid-statement,
bulkheads while the pool grows, a server at its connection limit, concurrent opens, a
close that cuts statements short, and two statements at once on one connection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest

from pglayer import (
    Connection,
    ConnectionLostError,
    Database,
    DatabaseUnavailableError,
    InvalidInputError,
    PglayerError,
    ProgrammingError,
    QueryTimeoutError,
    TransientError,
    deadline,
)
from tests.conftest import Server, backends, free_port, settings_for, wait_for


async def test_a_copy_whose_connection_is_killed_ends_as_a_lost_connection(
    db: Database, admin: asyncpg.Connection[Any]
) -> None:
    await db.run(lambda c: c.execute("CREATE TABLE loaded (a int, b text)"))

    async def rows() -> AsyncIterator[tuple[int, str]]:
        for i in range(1000):
            yield i, "x"
        await asyncio.sleep(20)  # a slow source: the COPY waits on it when it is cut off
        yield 1000, "x"

    async def load() -> str:
        async with db.connection() as conn:
            return await conn.copy_records("loaded", rows(), columns=["a", "b"], timeout=2.0)

    task = asyncio.create_task(load())
    await asyncio.sleep(0.5)
    await admin.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE query LIKE 'COPY%loaded%' AND pid <> pg_backend_pid()"
    )
    started = time.monotonic()
    with pytest.raises(PglayerError) as caught:
        await asyncio.wait_for(task, 10)  # asyncpg's COPY alone waited for ever
    assert time.monotonic() - started < 3.0
    assert db.stats().in_use == 0
    assert isinstance(caught.value, ConnectionLostError)  # not a timeout: db.run retries it


async def test_an_iterator_read_by_an_earlier_attempt_is_refused(db: Database) -> None:
    await db.run(lambda c: c.execute("CREATE TABLE loaded (a int)"))
    rows = ((i,) for i in range(10))
    async with db.connection() as conn:
        await conn.copy_records("loaded", rows, columns=["a"])
        with pytest.raises(ValueError, match="earlier attempt"):
            await conn.copy_records("loaded", rows, columns=["a"])  # as a retry would
        assert await conn.fetchval("SELECT count(*) FROM loaded") == 10


async def test_writes_stuck_on_a_lock_cannot_take_the_reads_share_while_the_pool_grows(
    db_url: str, admin: asyncpg.Connection[Any]
) -> None:
    settings = settings_for(db_url, min_size=0, max_size=8, acquire_timeout=1.0)
    async with Database(settings) as db:
        await db.run(lambda c: c.execute("CREATE TABLE hot (id int PRIMARY KEY, n int)"))
        await db.run(lambda c: c.execute("INSERT INTO hot VALUES (1, 0)"))
        holder: asyncpg.Connection[Any] = await asyncpg.connect(db_url)
        try:
            await holder.execute("BEGIN; SELECT * FROM hot WHERE id = 1 FOR UPDATE")

            async def write() -> None:
                sql = "UPDATE hot SET n = n + 1 WHERE id = 1"
                await db.run(lambda c: c.execute(sql), retry=False)

            writes = [asyncio.create_task(write()) for _ in range(20)]
            await asyncio.sleep(0.3)
            cap = db.stats().bulkheads["write"]
            assert cap.in_use <= cap.cap == 6, cap
            assert await db.read(lambda c: c.fetchval("SELECT 1"), timeout=0.5) == 1
        finally:
            await holder.close()  # the lock goes: the writes finish
        await asyncio.gather(*writes, return_exceptions=True)


@contextlib.asynccontextmanager
async def two_connections_allowed(
    server: Server, admin: asyncpg.Connection[Any], db_name: str
) -> AsyncIterator[str]:
    """The URL of a role the server lets open two connections (53300 past them)."""
    role = f"r_{uuid.uuid4().hex[:12]}"
    await admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw' CONNECTION LIMIT 2")
    try:
        parts = urlsplit(server.admin_url)
        yield f"postgresql://{role}:pw@{parts.hostname}:{parts.port}/{db_name}"
    finally:
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role
        )
        await admin.execute(f"DROP ROLE {role}")


async def test_callers_wait_for_pooled_connections_when_the_server_refuses_more(
    server: Server, admin: asyncpg.Connection[Any], db_name: str
) -> None:
    async with two_connections_allowed(server, admin, db_name) as url:
        settings = settings_for(url, min_size=1, max_size=5, acquire_timeout=5)
        async with Database(settings) as db:
            started = time.monotonic()

            async def hold() -> None:
                async with db.connection() as conn:
                    await conn.execute("SELECT pg_sleep(0.3)")

            # Two at a time: 53300 for the other callers' connects and for those made for
            # the waiters; every one of them waits for a connection that is open.
            await asyncio.gather(*(hold() for _ in range(8)))
            assert 1.1 < time.monotonic() - started < 4.0


async def test_a_pool_held_small_by_the_servers_limit_says_so_once(
    server: Server, admin: asyncpg.Connection[Any], db_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Another app's connections took the server's slots: callers waited on the two open,
    # p99 in seconds, and not a line in the log.
    async with two_connections_allowed(server, admin, db_name) as url:
        settings = settings_for(url, min_size=1, max_size=5, acquire_timeout=5)
        async with Database(settings) as db:

            async def hold() -> None:
                async with db.connection() as conn:
                    await conn.execute("SELECT pg_sleep(0.2)")

            await asyncio.gather(*(hold() for _ in range(6)))
    said = [r.getMessage() for r in caplog.records if "53300" in r.getMessage()]
    assert len(said) == 1, said
    assert "serving with 1 of 5" in said[0] or "serving with 2 of 5" in said[0], said


async def test_connections_that_came_back_while_callers_connected_serve_those_callers(
    server: Server, admin: asyncpg.Connection[Any], db_name: str
) -> None:
    # Short work on the two connections the server allows: they come back (idle, as nobody
    # waits yet) while the other callers' connects are refused; those callers then queued
    # with both connections idle, and waited out their deadline.
    async with two_connections_allowed(server, admin, db_name) as url:
        settings = settings_for(url, min_size=2, max_size=8, acquire_timeout=3)
        async with Database(settings) as db:
            go = asyncio.Event()

            async def hold() -> None:
                async with db.connection() as conn:
                    await conn.execute("SELECT 1")
                    await go.wait()

            holders = [asyncio.create_task(hold()) for _ in range(2)]
            await wait_for(lambda: asyncio.sleep(0, db.stats().in_use == 2))
            late = asyncio.create_task(db.run(lambda c: c.fetchval("SELECT 1"), retry=False))
            await asyncio.sleep(0.001)  # its connect is on its way, to be refused
            go.set()  # both come back while nobody waits in line yet
            await asyncio.gather(*holders)
            assert await late == 1  # not PoolTimeoutError after its 3 s deadline


async def test_two_opens_at_once_make_one_pool(
    db_url: str, db_name: str, admin: asyncpg.Connection[Any]
) -> None:
    db = Database(settings_for(db_url, min_size=3))
    await asyncio.gather(db.open(), db.open())
    try:
        assert len(await backends(admin, db_name)) == db.stats().size == 3
    finally:
        await db.close()

    async def none_left() -> bool:
        return not await backends(admin, db_name)

    assert await wait_for(none_left)


async def test_close_cancels_the_statements_it_cuts_short_on_the_server(
    db_url: str, db_name: str, admin: asyncpg.Connection[Any]
) -> None:
    # As behind PgBouncer, which drops this startup setting: the server would not notice.
    db = Database(settings_for(db_url, query_timeout=60, client_connection_check_interval=0))
    await db.open()
    sleeping = asyncio.create_task(db.run(lambda c: c.execute("SELECT pg_sleep(30)")))
    await asyncio.sleep(0.3)
    await db.close(timeout=0.2)
    with pytest.raises(PglayerError):
        await sleeping

    async def not_running() -> bool:
        rows = await backends(admin, db_name)
        return not [r for r in rows if "pg_sleep" in (r["query"] or "")]

    assert await wait_for(not_running, timeout=1.5)  # else it sleeps on for 30 s


async def test_a_deadline_entered_after_the_acquire_bounds_the_statements(db: Database) -> None:
    async with db.connection() as conn:
        started = time.monotonic()
        with deadline(0.3), pytest.raises(QueryTimeoutError):
            await conn.fetchval("SELECT pg_sleep(3)")
    assert time.monotonic() - started < 1.5


async def test_a_second_statement_at_once_on_one_connection_is_refused_and_harms_nothing(
    db: Database,
) -> None:
    async with db.connection() as conn:
        slow = asyncio.create_task(conn.fetchval("SELECT pg_sleep(0.3)"))
        await asyncio.sleep(0.05)
        with pytest.raises(ProgrammingError, match="one runs at a time"):
            await conn.fetchval("SELECT 1")
        await slow
    answers = [await db.run(lambda c: c.fetchval("SELECT 2")) for _ in range(6)]
    assert answers == [2] * 6
    assert db.stats().errors.get("ProgrammingError") == 1  # counted: its alert sees it


async def test_a_connection_left_with_a_statement_running_is_not_lent_as_it_is(
    db: Database,
) -> None:
    async with db.connection() as conn:
        orphan = asyncio.create_task(conn.fetchval("SELECT pg_sleep(0.5)"))
        await asyncio.sleep(0.05)
    # Its holder left without waiting for the statement: the next borrowers are unharmed.
    answers = [await db.run(lambda c: c.fetchval("SELECT 3")) for _ in range(6)]
    assert answers == [3] * 6
    await asyncio.gather(orphan, return_exceptions=True)


async def test_a_database_never_opened_or_closed_says_so(db_url: str) -> None:
    db = Database(settings_for(db_url))
    with pytest.raises(DatabaseUnavailableError, match=r"not open: `await db.open\(\)`"):
        await db.run(lambda c: c.fetchval("SELECT 1"), retry=False)
    async with db:
        assert await db.run(lambda c: c.fetchval("SELECT 1")) == 1
    with pytest.raises(DatabaseUnavailableError, match="was closed"):
        await db.run(lambda c: c.fetchval("SELECT 1"), retry=False)


async def test_a_database_not_open_is_not_retried(db_url: str) -> None:
    # Nothing is opening it: a retry cannot succeed, and its waits only delay the error.
    db = Database(settings_for(db_url, retry_attempts=5))
    with pytest.raises(DatabaseUnavailableError, match="not open"):
        await db.read(lambda c: c.fetchval("SELECT 1"))
    async with db:
        pass
    with pytest.raises(DatabaseUnavailableError, match="was closed"):
        await db.run_in_transaction(lambda c: c.fetchval("SELECT 1"))
    assert db.stats().retries == {}


async def test_executemany_refuses_an_iterator_an_earlier_attempt_read(db: Database) -> None:
    await db.run(lambda c: c.execute("CREATE TABLE loaded (a int)"))
    rows = ((i,) for i in range(10))
    async with db.connection() as conn:
        await conn.executemany("INSERT INTO loaded VALUES ($1)", rows)
        with pytest.raises(ValueError, match="earlier attempt"):
            await conn.executemany("INSERT INTO loaded VALUES ($1)", rows)


class Rows:
    """Re-iterable, not a Sequence, and not hashable: given twice, read twice."""

    __hash__ = None  # type: ignore[assignment]

    def __iter__(self) -> Iterator[tuple[int]]:
        return iter([(1,), (2,)])


async def test_copy_takes_a_re_iterable_that_is_neither_a_list_nor_hashable(
    db: Database,
) -> None:
    await db.run(lambda c: c.execute("CREATE TABLE loaded (a int)"))
    async with db.connection() as conn:
        for _ in range(2):
            await conn.copy_records("loaded", Rows(), columns=["a"])
        assert await conn.fetchval("SELECT count(*) FROM loaded") == 4


async def test_a_deadline_that_passes_before_commit_is_a_timeout_with_nothing_applied(
    db: Database,
) -> None:
    await db.run(lambda c: c.execute("CREATE TABLE t (a int)"))

    async def insert_then_wait(conn: Connection) -> None:
        async with conn.transaction():
            await conn.execute("INSERT INTO t VALUES (1)")
            await asyncio.sleep(0.3)  # COMMIT is not sent: not "outcome unknown"

    async with db.connection() as conn:
        with deadline(0.2), pytest.raises(QueryTimeoutError):
            await insert_then_wait(conn)
        assert await conn.fetchval("SELECT count(*) FROM t") == 0
    assert db.stats().connections_lost == 0  # rolled back, not terminated


async def test_a_savepoint_timed_out_inside_a_deadline_keeps_its_outer_transaction(
    db: Database,
) -> None:
    await db.run(lambda c: c.execute("CREATE TABLE t (a int)"))
    async with db.transaction() as conn:
        await conn.execute("INSERT INTO t VALUES (1)")
        with deadline(0.2), contextlib.suppress(QueryTimeoutError):
            async with conn.transaction():
                await conn.execute("SELECT pg_sleep(2)")
        await conn.execute("INSERT INTO t VALUES (2)")  # its ROLLBACK TO SAVEPOINT was sent
    assert await db.run(lambda c: c.fetchval("SELECT count(*) FROM t")) == 2


async def test_a_close_while_opening_leaves_nothing_open(
    db_url: str, db_name: str, admin: asyncpg.Connection[Any]
) -> None:
    db = Database(settings_for(db_url, min_size=3))
    opening = asyncio.create_task(db.open())
    await asyncio.sleep(0.01)
    await db.close()
    with pytest.raises(DatabaseUnavailableError, match="closed while it was opening"):
        await opening
    assert not db.is_open
    assert not await backends(admin, db_name)


async def test_a_savepoint_past_its_deadline_before_release_is_undone(db: Database) -> None:
    await db.run(lambda c: c.execute("CREATE TABLE t (a int)"))

    async def inner(conn: Connection) -> None:
        async with conn.transaction():
            await conn.execute("INSERT INTO t VALUES (6)")
            await asyncio.sleep(0.3)  # RELEASE is not sent: the savepoint rolls back

    async with db.transaction() as conn:
        await conn.execute("INSERT INTO t VALUES (5)")
        with deadline(0.2), pytest.raises(QueryTimeoutError):
            await inner(conn)
        await conn.execute("INSERT INTO t VALUES (7)")
    rows = await db.run(lambda c: c.fetch("SELECT a FROM t ORDER BY a"))
    assert [r["a"] for r in rows] == [5, 7]


async def test_a_close_during_a_retried_open_says_it_closed_it() -> None:
    url = f"postgresql://app:pw@127.0.0.1:{free_port()}/shop"  # nothing listens there
    db = Database(settings_for(url, require_on_startup=True, startup_timeout=10))
    opening = asyncio.create_task(db.open())
    await asyncio.sleep(0.3)
    await db.close()
    with pytest.raises(DatabaseUnavailableError, match="closed while it was opening"):
        await opening


async def test_an_argument_the_driver_refuses_leaves_the_connection_clean(db_url: str) -> None:
    # asyncpg leaves the server inside an extended query (no Sync) after failing to encode an
    # argument: its statement_timeout later fails whoever holds the connection next.
    db = Database(settings_for(db_url, min_size=1, max_size=1, statement_timeout=0.3))
    async with db:
        with pytest.raises(InvalidInputError):
            await db.read(lambda c: c.fetchrow("SELECT $1::bigint", 2**70))
        await asyncio.sleep(0.6)
        assert await db.run(lambda c: c.fetchval("SELECT 1"), retry=False) == 1


async def test_a_copy_of_a_value_the_driver_cannot_encode_is_invalid_input(
    db: Database,
) -> None:
    async def load(conn: Connection) -> None:
        await conn.execute("CREATE TEMP TABLE tt (id bigint) ON COMMIT DROP")
        await conn.copy_records("tt", [(1,), (2**70,)], columns=["id"])

    with pytest.raises(InvalidInputError):  # 422, not a 500 of an OverflowError
        await db.run_in_transaction(load)
    assert await db.run(lambda c: c.fetchval("SELECT 1")) == 1


async def set_read_only(admin: asyncpg.Connection[Any], db_name: str, on: bool) -> None:
    """`db_name` read-only (or not) for every session that starts from now on."""
    setting = (
        "SET default_transaction_read_only = on" if on else "RESET default_transaction_read_only"
    )
    await admin.execute(f'ALTER DATABASE "{db_name}" {setting}')


async def _create_temp_table(db: Database) -> None:
    await db.run(lambda c: c.execute("CREATE TEMP TABLE t (id int)"), retry=False)


async def test_writes_refused_by_a_read_only_database_replace_connections_once_a_second(
    db_url: str, db_name: str, admin: asyncpg.Connection[Any]
) -> None:
    await set_read_only(admin, db_name, True)
    try:
        async with Database(settings_for(db_url, max_size=4)) as db:
            before = db.stats().connections_opened
            for _ in range(20):  # well within a second
                with pytest.raises(DatabaseUnavailableError, match="read-only"):
                    await _create_temp_table(db)
            # One replacement of the connection open then, not one connect per refused write.
            assert db.stats().connections_opened - before <= 2
    finally:
        await set_read_only(admin, db_name, False)


async def test_writes_succeed_soon_after_a_read_only_database_is_writable_again(
    db_url: str, db_name: str, admin: asyncpg.Connection[Any]
) -> None:
    async def written() -> bool:
        with contextlib.suppress(DatabaseUnavailableError):
            await _create_temp_table(db)
            return True
        return False

    await set_read_only(admin, db_name, True)
    try:
        async with Database(settings_for(db_url, max_size=4)) as db:
            assert not any([await written() for _ in range(5)])
            await set_read_only(admin, db_name, False)
            assert await wait_for(written, timeout=5)
    finally:
        await set_read_only(admin, db_name, False)


async def test_a_database_that_refuses_writes_is_unavailable_and_its_sessions_are_not_kept(
    db_url: str,
) -> None:
    # A session keeps default_transaction_read_only from its start: one that refused a write
    # (a demoted primary, the setting turned on) would refuse it for ever once writable again.
    async with Database(settings_for(db_url, min_size=1, max_size=1)) as db:
        async with db.connection() as conn:
            await conn.execute("SET default_transaction_read_only = on")
        with pytest.raises(DatabaseUnavailableError, match="read-only"):
            await db.run(lambda c: c.execute("CREATE TEMP TABLE t (id int)"), retry=False)
        assert await db.run(lambda c: c.execute("CREATE TEMP TABLE t (id int)"))


async def test_a_pool_the_servers_limit_holds_at_none_says_so_as_a_warning(
    server: Server, admin: asyncpg.Connection[Any], db_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Its connection lost and its slot taken: only "refill failed" at INFO, while every
    # request of that worker was a 503.
    async with two_connections_allowed(server, admin, db_name) as url:
        settings = settings_for(url, min_size=1, max_size=1, acquire_timeout=1)
        async with Database(settings) as db:
            taken = [await asyncpg.connect(url)]
            try:
                async with db.connection() as conn:
                    await admin.execute(
                        "SELECT pg_terminate_backend($1)", conn.raw.get_server_pid()
                    )

                async def lost() -> bool:
                    return db.stats().size == 0

                await wait_for(lost)
                taken.append(await asyncpg.connect(url))
                with pytest.raises(TransientError):
                    async with db.connection():
                        pass
            finally:
                for raw in taken:
                    await raw.close()
    said = [r for r in caplog.records if "53300" in r.getMessage()]
    assert said, [r.getMessage() for r in caplog.records]
    assert said[0].levelno == logging.WARNING
    assert "it has none" in said[0].getMessage()
