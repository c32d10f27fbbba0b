"""The `pglayer[sqlalchemy]` extra: an AsyncSession with pglayer's errors and commit timing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import BackgroundTasks, FastAPI, Response
from pydantic import BaseModel
from sqlalchemy import BigInteger, String, func, select, text
from sqlalchemy.exc import DBAPIError, IntegrityError, InvalidRequestError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import pglayer
from pglayer import ConfigurationError, Connection, Database, DatabaseSettings
from pglayer._errors import StatementsLostError
from pglayer._http import PROTOCOL
from pglayer.fastapi import WriteTransaction, setup, transactional
from pglayer.fastapi.sqlalchemy import SqlSession, setup_sqlalchemy
from pglayer.sqlalchemy import count_engine, create_engine, session_transaction
from pglayer.testing import PgBouncer
from tests.conftest import LiveServer, asgi_client, free_port, refuses_to_start, settings_for
from tests.test_errors import SLOW_COMMIT, kill_when_committing
from tests.test_shop_users import assert_problem


class Base(DeclarativeBase):
    pass


class UserRow(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    email: Mapped[str] = mapped_column(String(254))


class NewUser(BaseModel):
    name: str
    email: str


@pytest.fixture
async def sa_client(db_url: str) -> AsyncIterator[httpx.AsyncClient]:
    settings = settings_for(db_url)
    app = FastAPI()
    setup(app, Database(settings))
    setup_sqlalchemy(app, create_engine(settings))

    @app.post("/sa/users", status_code=201)
    async def add_user(body: NewUser, session: SqlSession, response: Response) -> dict[str, int]:
        row = UserRow(name=body.name, email=body.email)
        session.add(row)
        await session.flush()
        await session.execute(text("INSERT INTO accounts (user_id) VALUES (:id)"), {"id": row.id})
        response.headers["Location"] = f"/users/{row.id}"
        return {"id": row.id}

    @app.post("/sa/deferred")
    async def deferred(session: SqlSession) -> dict[str, bool]:
        await session.execute(text("INSERT INTO sa_deferred VALUES (1), (1)"))
        return {"ok": True}

    @app.post("/sa/swallowed")
    async def swallowed(session: SqlSession) -> dict[str, bool]:
        session.add(UserRow(name="Ann", email="ann@example.com"))
        await session.flush()
        with contextlib.suppress(DBAPIError):
            await session.execute(text("SELECT 1 / 0"))  # caught, and the handler goes on
        return {"ok": True}

    @app.post("/sa/flush-caught")
    async def flush_caught(session: SqlSession) -> dict[str, bool]:
        session.add(UserRow(name="Bea", email="bea@example.com"))
        await session.flush()  # written, in the transaction
        session.add(UserRow(name="Bea", email="BEA@example.com"))  # the same email: unique
        with contextlib.suppress(IntegrityError):
            await session.flush()  # SQLAlchemy rolls the whole transaction back itself
        return {"ok": True}

    @app.post("/sa/savepoint")
    async def savepoint(session: SqlSession) -> dict[str, bool]:
        session.add(UserRow(name="Sam", email="sam@example.com"))
        await session.flush()
        with contextlib.suppress(DBAPIError):
            async with session.begin_nested():  # its failure is rolled back to the savepoint
                await session.execute(text("SELECT 1 / 0"))
        return {"ok": True}

    async with app.router.lifespan_context(app), asgi_client(app) as client:
        yield client


async def test_a_sqlalchemy_route_commits_before_answering(
    sa_client: httpx.AsyncClient, db_url: str
) -> None:
    response = await sa_client.post("/sa/users", json={"name": "Ada", "email": "ada@example.com"})
    assert response.status_code == 201, response.text
    assert await count_rows(db_url, "accounts") == 1


async def test_sqlalchemy_integrity_errors_become_pglayer_problems(
    sa_client: httpx.AsyncClient,
) -> None:
    await sa_client.post("/sa/users", json={"name": "Ada", "email": "ada@example.com"})
    response = await sa_client.post("/sa/users", json={"name": "Bob", "email": "ADA@example.com"})
    assert_problem(response, 409, "conflict")
    assert "sqlalchemy" not in response.text.lower()


async def test_a_failing_commit_through_sqlalchemy_is_not_a_2xx(
    sa_client: httpx.AsyncClient, db_url: str
) -> None:
    conn: asyncpg.Connection[Any] = await asyncpg.connect(db_url)
    try:
        await conn.execute("CREATE TABLE sa_deferred (k int UNIQUE DEFERRABLE INITIALLY DEFERRED)")
        response = await sa_client.post("/sa/deferred")
        assert_problem(response, 409, "conflict")
        assert await conn.fetchval("SELECT count(*) FROM sa_deferred") == 0
    finally:
        await conn.close()


async def count_rows(db_url: str, table: str) -> int:
    conn: asyncpg.Connection[Any] = await asyncpg.connect(db_url)
    try:
        return int(await conn.fetchval(f"SELECT count(*) FROM {table}"))
    finally:
        await conn.close()


# A statement's error (PostgreSQL then answers COMMIT with ROLLBACK), and a flush's (SQLAlchemy
# rolls the whole transaction back itself, the row flushed before it too).
@pytest.mark.parametrize("route", ["/sa/swallowed", "/sa/flush-caught"])
async def test_a_caught_error_is_not_answered_as_committed(
    sa_client: httpx.AsyncClient, db_url: str, route: str
) -> None:
    response = await sa_client.post(route)
    assert_problem(response, 500, "internal")
    assert await count_rows(db_url, "users") == 0


async def test_an_error_rolled_back_to_its_savepoint_still_commits(
    sa_client: httpx.AsyncClient, db_url: str
) -> None:
    assert (await sa_client.post("/sa/savepoint")).status_code == 200
    assert (await sa_client.post("/sa/users", json={"name": "A", "email": "a@x.org"})).is_success
    assert await count_rows(db_url, "users") == 2


async def test_the_engine_is_counted_in_the_pools_stats(db_url: str) -> None:
    settings = settings_for(db_url)
    async with Database(settings) as db:
        engine = create_engine(settings, database=db, pool_size=3)
        try:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
                engine_stats = db.stats().external["sqlalchemy"]
                assert engine_stats.max_size == 3
                assert engine_stats.in_use == 1
            assert db.stats().external["sqlalchemy"].idle == 1
            assert db.stats().as_dict()["external"]["sqlalchemy"]["max_size"] == 3
        finally:
            await engine.dispose()


async def test_the_engine_is_counted_in_the_connection_budget(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(db_url, max_size=60, workers=2, on_budget_exceeded="warn")
    db = Database(settings)
    engine = create_engine(settings, database=db, pool_size=60)  # 2 x (60 + 60) > 200
    try:
        async with db:
            pass
    finally:
        await engine.dispose()
    assert "connection budget exceeded" in caplog.text
    assert "+ sqlalchemy 60" in caplog.text


async def test_the_engine_recovers_from_lost_connections_without_failing_a_request(
    sa_client: httpx.AsyncClient, admin: asyncpg.Connection[Any], db_name: str
) -> None:
    await sa_client.post("/sa/users", json={"name": "Ada", "email": "ada@example.com"})
    await admin.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = $1 AND pid <> pg_backend_pid()",
        db_name,
    )
    await asyncio.sleep(0.2)
    response = await sa_client.post("/sa/users", json={"name": "Bob", "email": "bob@example.com"})
    assert response.status_code == 201, response.text


def orm_app(settings: DatabaseSettings) -> FastAPI:
    app = FastAPI()
    db = Database(settings)
    setup(app, db)
    setup_sqlalchemy(app, create_engine(database=db))
    return app


async def test_an_orm_route_answers_503_while_the_database_is_down() -> None:
    app = orm_app(settings_for(f"postgresql://postgres@127.0.0.1:{free_port()}/none",
                               require_on_startup=False))  # fmt: skip

    @app.get("/sa/one")
    async def one(session: SqlSession) -> int:
        return int(await session.scalar(text("SELECT 1")) or 0)

    async with app.router.lifespan_context(app), asgi_client(app) as client:
        response = await client.get("/sa/one")
    assert_problem(response, 503, "unavailable")
    assert "retry-after" in response.headers


async def test_an_orm_route_answers_503_while_the_server_refuses_its_database(
    db_url: str, db_name: str, admin: asyncpg.Connection[Any]
) -> None:
    app = orm_app(settings_for(db_url))

    @app.get("/sa/one")
    async def one(session: SqlSession) -> int:
        return int(await session.scalar(text("SELECT 1")) or 0)

    async with app.router.lifespan_context(app), asgi_client(app) as client:
        await admin.execute(f'ALTER DATABASE "{db_name}" ALLOW_CONNECTIONS false')  # 55000
        try:
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                db_name,
            )
            response = await client.get("/sa/one")
        finally:
            await admin.execute(f'ALTER DATABASE "{db_name}" ALLOW_CONNECTIONS true')
    assert_problem(response, 503, "unavailable")
    assert "retry-after" in response.headers


async def test_an_orm_statement_past_the_query_timeout_is_504(db_url: str) -> None:
    app = orm_app(settings_for(db_url, query_timeout=0.3, statement_timeout=30))

    @app.get("/sa/slow")
    async def slow(session: SqlSession) -> None:
        await session.execute(text("SELECT pg_sleep(2)"))

    async with app.router.lifespan_context(app), asgi_client(app) as client:
        response = await client.get("/sa/slow")
    assert_problem(response, 504, "timeout")


@pytest.mark.parametrize("ends", ["commit", "rollback"])
async def test_a_handler_that_ends_the_sessions_transaction_is_refused(
    db_url: str, ends: str
) -> None:
    # The dependency commits: a commit in the handler would apply its writes before the
    # handler is done, and a rollback discard them behind a 2xx.
    app = orm_app(settings_for(db_url))

    @app.post("/sa/ends")
    async def end(session: SqlSession) -> None:
        session.add(UserRow(name="Ann", email="ann@example.com"))
        await session.flush()
        await getattr(session, ends)()

    async with app.router.lifespan_context(app), asgi_client(app) as client:
        response = await client.post("/sa/ends")
    assert_problem(response, 500, "internal")
    assert await count_rows(db_url, "users") == 0


async def test_a_route_with_a_session_and_a_pglayer_transaction_refuses_to_start(
    db_url: str,
) -> None:
    app = orm_app(settings_for(db_url))

    @app.post("/sa/mixed")
    async def mixed(session: SqlSession, conn: WriteTransaction) -> None:
        pass

    await refuses_to_start(app, r"two transactions.*/sa/mixed \(session, conn\)")


async def test_a_transactional_handler_with_a_session_refuses_to_start(db_url: str) -> None:
    app = orm_app(settings_for(db_url))

    @app.post("/sa/replayed")
    @transactional()
    async def replayed(conn: Connection, session: SqlSession) -> None:
        pass

    await refuses_to_start(app, r"@transactional.*/sa/replayed \(session\)")


async def test_two_engines_are_both_counted(db_url: str) -> None:
    settings = settings_for(db_url)
    db = Database(settings)
    first = create_engine(database=db, pool_size=3)
    second = create_engine(database=db, pool_size=2)
    count_engine(db, first)  # counting the same engine again changes nothing
    try:
        assert sorted(s.max_size for s in db.stats().external.values()) == [2, 3]
    finally:
        await first.dispose()
        await second.dispose()


async def test_a_sessions_isolation_is_set_by_its_first_call(db_url: str) -> None:
    # As the README says; and the connection goes back to the pool at the default.
    app = orm_app(settings_for(db_url))

    @app.get("/sa/isolation")
    async def isolation(session: SqlSession, strict: bool = False) -> str:
        if strict:
            await session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        return str(await session.scalar(text("SHOW transaction_isolation")))

    async with app.router.lifespan_context(app), asgi_client(app) as client:
        levels = [(await client.get("/sa/isolation", params={"strict": s})).json()
                  for s in ("true", "false")]  # fmt: skip
    assert levels == ["repeatable read", "read committed"]


async def slow_commit_app(db_url: str) -> FastAPI:
    """An ORM app whose `POST /sa/slow` commits for 10 s (a deferred trigger)."""
    conn: asyncpg.Connection[Any] = await asyncpg.connect(db_url)
    try:
        await conn.execute(SLOW_COMMIT)
    finally:
        await conn.close()
    app = orm_app(settings_for(db_url))

    @app.post("/sa/slow")
    async def slow(session: SqlSession) -> None:
        await session.execute(text("INSERT INTO slow VALUES (1)"))

    return app


async def test_an_orm_commit_whose_connection_is_lost_is_commit_unknown(
    db_url: str, admin: asyncpg.Connection[Any], db_name: str
) -> None:
    # COMMIT was sent: it may have applied, so the client must not be told to retry.
    app = await slow_commit_app(db_url)
    async with app.router.lifespan_context(app), asgi_client(app) as client:
        killer = asyncio.create_task(kill_when_committing(admin, db_name))
        response = await client.post("/sa/slow")
        await killer
    assert_problem(response, 500, "commit_unknown")


async def test_a_client_that_leaves_during_an_orm_commit_is_a_499_not_commit_unknown(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Its cancellation was taken for a lost connection: ERROR "COMMIT outcome unknown" and a
    # 500 in the metrics, where pglayer's own transaction logs the client leaving (499).
    app = await slow_commit_app(db_url)
    async with app.router.lifespan_context(app), LiveServer(app, http=PROTOCOL) as server:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
            with pytest.raises(httpx.ReadTimeout):
                await client.post("/sa/slow", timeout=1.0)  # it leaves during the COMMIT
        await asyncio.sleep(0.5)  # the server notices, and the handler is cancelled
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], errors
    conn = await asyncpg.connect(db_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM slow") == 0  # cancelled: rolled back
    finally:
        await conn.close()


async def test_a_session_used_after_its_handler_is_refused_and_leaks_nothing(
    db_url: str,
) -> None:
    # A closed session would begin again, on a connection nothing gives back.
    app = orm_app(settings_for(db_url))
    kept, failed = [], []

    async def use(session: AsyncSession) -> None:
        try:
            await session.execute(text("SELECT 1"))
        except InvalidRequestError as exc:
            failed.append(exc)

    @app.post("/sa/later")
    async def later(session: SqlSession, tasks: BackgroundTasks) -> None:
        kept.append(session)  # alive: the garbage collector does not give it back either
        tasks.add_task(use, session)

    async with app.router.lifespan_context(app), asgi_client(app) as client:
        for _ in range(3):
            await client.post("/sa/later")
        engine = app.state.pglayer_sessions.kw["bind"]
        assert engine.pool.checkedout() == 0
    assert len(failed) == 3


async def test_the_request_deadline_bounds_orm_statements(db_url: str) -> None:
    app = orm_app(settings_for(db_url, query_timeout=10, statement_timeout=10))

    @app.get("/sa/bounded")
    async def bounded(session: SqlSession) -> None:
        with pglayer.deadline(0.3):
            await session.execute(text("SELECT pg_sleep(3)"))

    async with app.router.lifespan_context(app), asgi_client(app) as client:
        started = time.monotonic()
        response = await client.get("/sa/bounded")
    assert_problem(response, 504, "timeout")
    assert time.monotonic() - started < 2.5


async def test_a_second_engine_bound_to_one_app_is_refused(db_url: str) -> None:
    app = orm_app(settings_for(db_url))
    with pytest.raises(ConfigurationError, match="already"):
        setup_sqlalchemy(app, create_engine(settings_for(db_url)))


async def test_a_rollback_in_the_handler_is_said_as_such(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = orm_app(settings_for(db_url))

    @app.post("/sa/rolled")
    async def rolled(session: SqlSession) -> None:
        await session.execute(text("SELECT 1"))
        await session.rollback()
        await session.execute(text("SELECT 2"))  # a transaction of its own, begun anew

    async with app.router.lifespan_context(app), asgi_client(app) as client:
        await client.post("/sa/rolled")
    logged = [str(r.exc_info[1]) for r in caplog.records if r.exc_info]
    assert len(logged) == 1
    assert "was ended in its block (session.rollback())" in logged[0]


@pytest.mark.parametrize("given", ["database", "settings"])
async def test_an_engine_behind_a_transaction_pooler_runs_sessions_without_errors(
    tx_bouncer: PgBouncer, db_name: str, given: str
) -> None:
    # PgBouncer closed every connection that sent `statement_timeout` at startup (a 503 for
    # each ORM request while readiness said ok); without that, SQLAlchemy's named
    # statements met each other on PgBouncer's three server connections.
    settings = settings_for(tx_bouncer.url(db_name), max_size=6)
    async with Database(settings) as db:
        engine = create_engine(database=db) if given == "database" else create_engine(settings)
        sessions = async_sessionmaker(engine)

        async def add(i: int) -> None:
            async with session_transaction(sessions) as session:
                session.add(UserRow(name=f"u{i}", email=f"u{i}@example.com"))
                await session.flush()
                await session.execute(select(UserRow).where(UserRow.name == f"u{i}"))

        try:
            for _ in range(3):  # a statement prepared in one round is reused by the next
                await asyncio.gather(*(add(i) for i in range(_ * 20, _ * 20 + 20)))
            async with session_transaction(sessions) as session:
                count = await session.scalar(select(func.count()).select_from(UserRow))
        finally:
            await engine.dispose()
    assert count == 60


async def test_statements_lost_to_the_server_are_transient_not_the_apps_bug(
    db_url: str,
) -> None:
    # An engine not fitted to its pooler: the driver's statements gone (26000) were a 500.
    engine = create_engine(settings_for(db_url))
    sessions = async_sessionmaker(engine)

    async def lose_statements() -> None:
        async with session_transaction(sessions) as session:
            await session.execute(select(UserRow).where(UserRow.id == 1))
            await session.execute(text("DEALLOCATE ALL"))
            await session.execute(select(UserRow).where(UserRow.id == 1))

    try:
        with pytest.raises(StatementsLostError):
            await lose_statements()
    finally:
        await engine.dispose()
