"""Each SQLSTATE class, produced by a real server, and the problem response it becomes."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from fastapi import FastAPI
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pglayer import (
    CheckViolationError,
    ConnectionLostError,
    Database,
    DatabaseError,
    DatabaseNotAnsweringError,
    DeadlockError,
    ForeignKeyViolationError,
    IntegrityError,
    InvalidInputError,
    LockTimeoutError,
    NotNullViolationError,
    PoolOverloadedError,
    ProgrammingError,
    QueryTimeoutError,
    SerializationError,
    TooManyConnectionsError,
    UniqueViolationError,
    set_retry_testing,
)
from pglayer._errors import class_for_sqlstate, explain_connect_error, raise_translated, translate
from pglayer.fastapi import Db, Problem, WriteTransaction, setup
from pglayer.fastapi._problems import problem_for_database_error, problem_response
from tests.conftest import Server, asgi_client, backends, logs_clock, settings_for, wait_for

LEAKS = ("asyncpg", "Traceback", "SELECT", "INSERT", "UPDATE", "postgres:", "Error:")

SCHEMA = """
CREATE TABLE parent (id int PRIMARY KEY);
CREATE TABLE child (
    id int PRIMARY KEY,
    parent_id int REFERENCES parent (id),
    qty int NOT NULL CHECK (qty >= 0)
);
INSERT INTO parent VALUES (1), (2);
INSERT INTO child VALUES (1, 1, 5), (2, 2, 5);
"""


def build_app(db: Database, db_url: str) -> FastAPI:
    app = FastAPI()
    setup(app, db)

    @app.post("/unique")
    async def unique(conn: WriteTransaction) -> None:
        await conn.execute("INSERT INTO parent VALUES (1)")

    @app.post("/foreign-key")
    async def foreign_key(conn: WriteTransaction) -> None:
        await conn.execute("INSERT INTO child VALUES (3, 999, 1)")

    @app.post("/check")
    async def check(conn: WriteTransaction) -> None:
        await conn.execute("UPDATE child SET qty = -1 WHERE id = 1")

    @app.post("/not-null")
    async def not_null(conn: WriteTransaction) -> None:
        await conn.execute("INSERT INTO child VALUES (4, 1, NULL)")

    @app.get("/division-by-zero")
    async def division(db: Db) -> None:
        await db.run(lambda c: c.fetchval("SELECT 1 / 0"))

    @app.get("/bad-cast")
    async def bad_cast(db: Db) -> None:
        await db.run(lambda c: c.fetchval("SELECT $1::text::int", "twelve"))

    @app.get("/int64-overflow")
    async def overflow(db: Db) -> None:
        await db.run(lambda c: c.fetchval("SELECT $1::int8", 2**63))

    @app.get("/statement-timeout")
    async def statement_timeout(conn: WriteTransaction) -> None:
        await conn.execute("SET LOCAL statement_timeout = 50")
        await conn.execute("SELECT pg_sleep(2)")

    @app.post("/lock-timeout")
    async def lock_timeout(conn: WriteTransaction) -> None:
        await conn.execute("SET LOCAL lock_timeout = 50")
        await conn.execute("UPDATE child SET qty = qty + 1 WHERE id = 2")

    @app.post("/serialization")
    async def serialization(db: Db) -> None:
        async with db.transaction(isolation="repeatable_read") as conn:
            await conn.fetchval("SELECT qty FROM child WHERE id = 1")  # takes the snapshot
            other: asyncpg.Connection[Any] = await asyncpg.connect(db_url)
            try:
                await other.execute("UPDATE child SET qty = qty + 1 WHERE id = 1")
            finally:
                await other.close()
            await conn.execute("UPDATE child SET qty = qty + 1 WHERE id = 1")

    @app.post("/deadlock")
    async def deadlock(conn: WriteTransaction) -> None:
        # This transaction checks for deadlocks after 10 ms, the other after 5 s: it is
        # the one PostgreSQL picks as the victim.
        await conn.execute("SET LOCAL deadlock_timeout = 10")
        await conn.execute("UPDATE child SET qty = qty WHERE id = 1")
        other: asyncpg.Connection[Any] = await asyncpg.connect(db_url)
        try:
            await other.execute("SET deadlock_timeout = 5000; BEGIN")
            await other.execute("UPDATE child SET qty = qty WHERE id = 2")
            blocked = asyncio.create_task(other.execute("UPDATE child SET qty = qty WHERE id = 1"))
            await asyncio.sleep(0.1)
            try:
                await conn.execute("UPDATE child SET qty = qty WHERE id = 2")
            finally:
                await blocked
                await other.execute("ROLLBACK")
        finally:
            await other.close()

    @app.get("/undefined-table")
    async def undefined_table(db: Db) -> None:
        await db.run(lambda c: c.fetch("SELECT * FROM no_such_table"))

    @app.get("/sleep")
    async def sleep(conn: WriteTransaction) -> None:
        await conn.execute("SELECT pg_sleep(30)")

    return app


@pytest.fixture
async def err_db(db_url: str) -> AsyncIterator[Database]:
    async with Database(settings_for(db_url, retry_attempts=1)) as db:
        async with db.connection() as conn:
            await conn.execute(SCHEMA)
        yield db


@pytest.fixture
async def err_client(err_db: Database, db_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(build_app(err_db, db_url)) as client:
        yield client


def assert_clean_problem(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["code"] == code
    for leak in LEAKS:
        assert leak not in response.text, leak
    if status == 503:
        assert int(response.headers["retry-after"]) >= 1


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("POST", "/unique", 409, "conflict"),
        ("POST", "/foreign-key", 409, "conflict"),
        ("POST", "/check", 422, "validation_error"),
        ("POST", "/not-null", 422, "validation_error"),
        ("GET", "/division-by-zero", 422, "validation_error"),
        ("GET", "/bad-cast", 422, "validation_error"),
        ("GET", "/int64-overflow", 422, "validation_error"),
        ("GET", "/statement-timeout", 504, "timeout"),
        ("POST", "/serialization", 503, "busy"),
        ("POST", "/deadlock", 503, "busy"),
        ("GET", "/undefined-table", 500, "internal"),
    ],
)
async def test_sqlstate_becomes_its_problem_response(
    err_client: httpx.AsyncClient, method: str, path: str, status: int, code: str
) -> None:
    response = await err_client.request(method, path)
    assert_clean_problem(response, status, code)


async def test_lock_timeout_on_a_held_row_lock_is_503_busy(
    err_client: httpx.AsyncClient, db_url: str
) -> None:
    holder: asyncpg.Connection[Any] = await asyncpg.connect(db_url)
    try:
        await holder.execute("BEGIN; SELECT 1 FROM child WHERE id = 2 FOR UPDATE")
        response = await err_client.post("/lock-timeout")
    finally:
        await holder.close()
    assert_clean_problem(response, 503, "busy")
    assert response.headers["retry-after"] == "1"


async def test_too_many_connections_for_a_role_is_503(
    server: Server, admin: asyncpg.Connection[Any], db_name: str
) -> None:
    role = f"limited_{uuid.uuid4().hex[:8]}"
    await admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw' CONNECTION LIMIT 0")
    try:
        host_port = server.admin_url.split("@", 1)[1].rsplit("/", 1)[0]
        url = f"postgresql://{role}:pw@{host_port}/{db_name}"
        db = Database(
            settings_for(url, min_size=0, require_on_startup=False, retry_attempts=1, pooler="none")
        )
        app = FastAPI()
        setup(app, db)

        @app.get("/one")
        async def one(db: Db) -> int:
            return int(await db.run(lambda c: c.fetchval("SELECT 1")))

        async with app.router.lifespan_context(app), asgi_client(app) as client:
            response = await client.get("/one")
        assert_clean_problem(response, 503, "unavailable")
        assert db.stats().give_ups == {"too_many_connections": 1}
    finally:
        await admin.execute(f"DROP ROLE {role}")


async def test_a_backend_terminated_mid_query_is_503_and_nothing_leaks(
    err_client: httpx.AsyncClient, err_db: Database, admin: asyncpg.Connection[Any], db_name: str
) -> None:
    request = asyncio.create_task(err_client.get("/sleep"))

    async def sleeper() -> int | None:
        for b in await backends(admin, db_name):
            if "pg_sleep" in (b["query"] or ""):
                return int(b["pid"])
        return None

    pid = await wait_for(sleeper)
    assert pid
    await admin.execute("SELECT pg_terminate_backend($1)", pid)
    response = await request
    assert_clean_problem(response, 503, "unavailable")
    assert err_db.stats().in_use == 0


async def test_errors_keep_sqlstate_names_and_cause(err_db: Database) -> None:
    async with err_db.connection() as conn:
        with pytest.raises(UniqueViolationError) as unique:
            await conn.execute("INSERT INTO parent VALUES (1)")
        with pytest.raises(ForeignKeyViolationError) as fk:
            await conn.execute("INSERT INTO child VALUES (3, 999, 1)")
        with pytest.raises(CheckViolationError) as check:
            await conn.execute("UPDATE child SET qty = -1")
        with pytest.raises(NotNullViolationError) as not_null:
            await conn.execute("INSERT INTO child VALUES (4, 1, NULL)")
        with pytest.raises(InvalidInputError) as client_side:
            await conn.fetchval("SELECT $1::int8", 2**63)
        with pytest.raises(ProgrammingError) as programming:
            await conn.fetch("SELECT nope FROM parent")
    assert (unique.value.sqlstate, unique.value.constraint, unique.value.table) == (
        "23505",
        "parent_pkey",
        "parent",
    )
    assert (fk.value.sqlstate, fk.value.constraint) == ("23503", "child_parent_id_fkey")
    assert (check.value.sqlstate, check.value.constraint) == ("23514", "child_qty_check")
    assert (not_null.value.sqlstate, not_null.value.column) == ("23502", "qty")
    assert programming.value.sqlstate == "42703"
    assert isinstance(unique.value.__cause__, asyncpg.UniqueViolationError)
    assert isinstance(client_side.value.__cause__, asyncpg.PostgresError | asyncpg.InterfaceError)
    # The message is ours, never the server's text.
    assert "duplicate key" not in str(unique.value)


async def test_a_transaction_is_replayed_whole_after_a_serialization_failure(
    err_db: Database, db_url: str
) -> None:
    attempts = 0

    async def body(conn: Any) -> int:
        nonlocal attempts
        attempts += 1
        qty = int(await conn.fetchval("SELECT qty FROM child WHERE id = 1"))
        if attempts == 1:
            other: asyncpg.Connection[Any] = await asyncpg.connect(db_url)
            try:
                await other.execute("UPDATE child SET qty = qty + 100 WHERE id = 1")
            finally:
                await other.close()
        await conn.execute("UPDATE child SET qty = $1 WHERE id = 1", qty + 1)
        return qty + 1

    db = Database(settings_for(db_url, retry_attempts=3, retry_initial_wait=0.01))
    async with db:
        result = await db.run_in_transaction(body, isolation="repeatable_read")
        assert db.stats().retries == {"serialization_failure": 1}
    assert attempts == 2
    assert result == 106  # 5, +100 by the other writer, +1 by the replay: no lost update


async def test_retries_stop_at_the_attempt_bound_and_count_the_give_up(db_url: str) -> None:
    calls = 0

    async def always_conflicts(conn: Any) -> None:
        nonlocal calls
        calls += 1
        raise translate(asyncpg.SerializationError("conflict"))

    set_retry_testing(True)
    try:
        async with Database(settings_for(db_url, retry_attempts=3)) as db:
            with pytest.raises(SerializationError):
                await db.run_in_transaction(always_conflicts)
            stats = db.stats()
    finally:
        set_retry_testing(False)
    assert calls == 3
    assert stats.retries == {"serialization_failure": 2}
    assert stats.give_ups == {"serialization_failure": 1}


def _all_postgres_error_classes() -> list[type[asyncpg.PostgresError]]:
    seen: list[type[asyncpg.PostgresError]] = []
    stack: list[type[asyncpg.PostgresError]] = [asyncpg.PostgresError]
    while stack:
        cls = stack.pop()
        for sub in cls.__subclasses__():
            stack.append(sub)
            if isinstance(getattr(sub, "sqlstate", None), str):
                seen.append(sub)
    return sorted(seen, key=lambda c: (c.sqlstate, c.__name__))


ALL_ERROR_CLASSES = _all_postgres_error_classes()
KNOWN_SQLSTATES = sorted({cls.sqlstate for cls in ALL_ERROR_CLASSES})

# What each SQLSTATE must become, from the documented hierarchy (errors.py, the README's
# table), not from the code under test: (pglayer class, HTTP status, problem code).
Expected = tuple[type[DatabaseError], int, str]
UNAVAILABLE: Expected = (ConnectionLostError, 503, "unavailable")
EXPECTED_BY_CODE: dict[str, Expected] = {
    "23505": (UniqueViolationError, 409, "conflict"),
    "23503": (ForeignKeyViolationError, 409, "conflict"),
    "23514": (CheckViolationError, 422, "validation_error"),
    "23502": (NotNullViolationError, 422, "validation_error"),
    "40001": (SerializationError, 503, "busy"),
    "40P01": (DeadlockError, 503, "busy"),
    "53300": (TooManyConnectionsError, 503, "unavailable"),
    "55P03": (LockTimeoutError, 503, "busy"),
    "57014": (QueryTimeoutError, 504, "timeout"),
    "57P01": UNAVAILABLE,  # admin shutdown
    "57P02": UNAVAILABLE,  # crash shutdown
    "57P03": UNAVAILABLE,  # cannot connect now
}
EXPECTED_BY_CLASS: dict[str, Expected] = {
    "08": UNAVAILABLE,
    "22": (InvalidInputError, 422, "validation_error"),
    # Any other integrity violation (exclusion, restrict) is a conflict with stored data.
    "23": (IntegrityError, 409, "conflict"),
    "42": (ProgrammingError, 500, "internal"),
}
EXPECTED_OTHERWISE: Expected = (DatabaseError, 500, "internal")


def expected_for(sqlstate: str) -> Expected:
    return (
        EXPECTED_BY_CODE.get(sqlstate) or EXPECTED_BY_CLASS.get(sqlstate[:2]) or EXPECTED_OTHERWISE
    )


def test_the_expectations_cover_every_documented_mapping() -> None:
    # Every exact code and class above is one asyncpg knows: no expectation tests nothing.
    assert set(EXPECTED_BY_CODE) <= set(KNOWN_SQLSTATES)
    assert set(EXPECTED_BY_CLASS) <= {code[:2] for code in KNOWN_SQLSTATES}
    assert len(ALL_ERROR_CLASSES) >= 250


@pytest.mark.parametrize("cls", ALL_ERROR_CLASSES, ids=lambda c: f"{c.sqlstate}-{c.__name__}")
def test_every_asyncpg_error_class_translates_to_its_documented_error_and_status(
    cls: type[asyncpg.PostgresError],
) -> None:
    error_class, status, code = expected_for(cls.sqlstate)
    for message in ("message text that must not matter", "connection refused: deadlock"):
        translated = translate(cls(message))
        assert type(translated) is error_class
        assert isinstance(translated, DatabaseError)
        assert translated.sqlstate == cls.sqlstate
        assert message not in str(translated)
        problem = problem_for_database_error(translated)
        assert (problem.status, problem.code) == (status, code)
        assert ("Retry-After" in problem_response(problem).headers) == (status == 503)


# Codes drawn from the real table (so that exact matches are hit), or of a known class with
# any subclass, or of any valid shape: two then three characters of [0-9A-Z].
_CHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
sqlstates = st.one_of(
    st.sampled_from(KNOWN_SQLSTATES),
    st.sampled_from(sorted({*EXPECTED_BY_CLASS, *(c[:2] for c in EXPECTED_BY_CODE)})).flatmap(
        lambda prefix: st.text(_CHARS, min_size=3, max_size=3).map(lambda rest: prefix + rest)
    ),
    st.text(_CHARS, min_size=5, max_size=5),
)


def _with_every_expectation(test: Callable[[str], None]) -> Callable[[str], None]:
    # Every exact code and class is tried on each run, whatever the draw.
    for sqlstate in [*EXPECTED_BY_CODE, *(prefix + "000" for prefix in EXPECTED_BY_CLASS)]:
        test = example(sqlstate)(test)
    return test


@settings(max_examples=300)
@_with_every_expectation
@given(sqlstates)
def test_classification_depends_only_on_the_sqlstate(sqlstate: str) -> None:
    error_class, status, code = expected_for(sqlstate)
    assert class_for_sqlstate(sqlstate) is error_class
    # As the driver builds it from the server's message, known code or not.
    for message in ("", "deadlock detected; connection lost"):
        raised = asyncpg.PostgresError.new({"C": sqlstate, "M": message})
        translated = translate(raised)
        assert type(translated) is error_class
        assert isinstance(translated, DatabaseError)
        problem = problem_for_database_error(translated)
        assert (problem.status, problem.code) == (status, code)


async def test_a_statement_timeout_frees_its_connection(db_url: str) -> None:
    db = Database(settings_for(db_url, min_size=1, max_size=1, retry_attempts=1))
    app = build_app(db, db_url)
    async with app.router.lifespan_context(app), asgi_client(app) as client:
        first = await client.get("/statement-timeout")
        assert_clean_problem(first, 504, "timeout")
        # The pool's only connection is back and usable.
        second = await client.get("/division-by-zero")
        assert_clean_problem(second, 422, "validation_error")
        assert db.stats().in_use == 0
        assert db.stats().acquire_timeouts == 0


SLOW_COMMIT = """
CREATE TABLE slow (k int);
CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_sleep(10); RETURN NULL; END $$;
CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON slow
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit();
"""


async def kill_when_committing(admin: asyncpg.Connection[Any], db_name: str) -> None:
    async def committing() -> int | None:
        for b in await backends(admin, db_name):
            if (b["query"] or "").strip().upper().startswith("COMMIT") and b["state"] == "active":
                return int(b["pid"])
        return None

    pid = await wait_for(committing)
    assert pid
    await admin.execute("SELECT pg_terminate_backend($1)", pid)


async def test_a_connection_lost_during_commit_is_indeterminate_and_never_replayed(
    err_db: Database, admin: asyncpg.Connection[Any], db_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    from pglayer import CommitIndeterminateError

    async with err_db.connection() as conn:
        await conn.execute(SLOW_COMMIT)
    attempts = 0

    async def body(conn: Any) -> None:
        nonlocal attempts
        attempts += 1
        await conn.execute("INSERT INTO slow VALUES (1)")

    db = Database(settings_for(err_db.settings.dsn(), retry_attempts=5, retry_initial_wait=0.01))
    async with db:
        killer = asyncio.create_task(kill_when_committing(admin, db_name))
        with pytest.raises(CommitIndeterminateError):
            await db.run_in_transaction(body)
        await killer
    assert attempts == 1
    assert "COMMIT outcome unknown" in caplog.text


async def test_a_one_statement_write_lost_in_flight_is_indeterminate_and_never_replayed(
    err_db: Database, admin: asyncpg.Connection[Any], db_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    from pglayer import CommitIndeterminateError

    attempts = 0

    async def write(conn: Any) -> None:
        nonlocal attempts
        attempts += 1
        await conn.execute("SELECT pg_sleep(10)")

    async def running() -> int | None:
        for b in await backends(admin, db_name):
            if "pg_sleep(10)" in (b["query"] or "") and b["state"] == "active":
                return int(b["pid"])
        return None

    db = Database(settings_for(err_db.settings.dsn(), retry_attempts=5, retry_initial_wait=0.01))
    async with db:
        task = asyncio.create_task(db.run(write, lock_timeout=1.0))
        pid = await wait_for(running)
        await admin.execute("SELECT pg_terminate_backend($1)", pid)
        with pytest.raises(CommitIndeterminateError):
            await task
    assert attempts == 1
    assert "Autocommit write outcome unknown" in caplog.text


async def test_a_one_statement_write_the_driver_refused_to_start_is_replayed(
    err_db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    attempts = 0

    async def write(conn: Any) -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            # What asyncpg raises for a pooled connection the server ended while it sat idle
            # (its protocol still consuming the FATAL error), as pglayer's methods raise it.
            refused = asyncpg.InternalClientError(
                "cannot switch to state 12; another operation (2) is in progress"
            )
            raise_translated(refused, translate(refused))
        await conn.execute("INSERT INTO parent VALUES (3)")

    db = Database(settings_for(err_db.settings.dsn(), retry_attempts=3, retry_initial_wait=0.01))
    async with db:
        await db.run(write, lock_timeout=1.0)  # one statement in autocommit, as the shop's
        assert await db.read(lambda c: c.fetchval("SELECT count(*) FROM parent WHERE id = 3")) == 1
    assert attempts == 2
    assert "outcome unknown" not in caplog.text


async def test_an_indeterminate_commit_answers_500_commit_unknown_without_retry_after(
    err_db: Database, admin: asyncpg.Connection[Any], db_name: str
) -> None:
    async with err_db.connection() as conn:
        await conn.execute(SLOW_COMMIT)
    app = FastAPI()
    setup(app, err_db)

    @app.post("/slow")
    async def slow(conn: WriteTransaction) -> None:
        await conn.execute("INSERT INTO slow VALUES (1)")

    async with asgi_client(app) as client:
        killer = asyncio.create_task(kill_when_committing(admin, db_name))
        response = await client.post("/slow")
        await killer
    assert_clean_problem(response, 500, "commit_unknown")
    assert "retry-after" not in response.headers
    assert "Idempotency-Key" in response.json()["detail"]


@pytest.mark.parametrize(
    ("predicted", "header"), [(None, "1"), (0.2, "1"), (3.4, "4"), (776.0, "10")]
)
def test_retry_after_is_the_predicted_wait_within_one_to_ten_seconds(
    predicted: float | None, header: str
) -> None:
    # 776 s was seen after a one-second restart: the pace measured while connections were
    # rebuilt was near zero.
    problem = problem_for_database_error(PoolOverloadedError(retry_after=predicted))
    assert problem.headers == {"Retry-After": header}


def test_a_database_that_answers_nothing_is_503_unavailable_with_retry_after() -> None:
    response = problem_response(problem_for_database_error(DatabaseNotAnsweringError()))
    assert response.status_code == 503
    assert orjson.loads(response.body)["code"] == "unavailable"
    assert response.headers["Retry-After"] == "1"


def test_a_problem_of_a_status_pglayer_does_not_name_takes_http_s_reason_phrase() -> None:
    assert Problem(418).title == "I'm a Teapot"
    assert Problem(599).title == "Error"  # no phrase in HTTP for it


async def test_an_outages_503s_are_logged_once_a_second_and_each_500_alone(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = logs_clock(monkeypatch, 1000.0)
    app = FastAPI()
    setup(app, Database(settings_for("postgresql://u@127.0.0.1:1/x")))

    @app.get("/lost")
    async def lost() -> None:
        raise ConnectionLostError()

    @app.get("/bug")
    async def bug() -> None:
        raise ProgrammingError(sqlstate="42703")

    caplog.set_level("INFO", logger="pglayer.http")
    async with asgi_client(app) as client:
        for _ in range(5):
            assert (await client.get("/lost")).status_code == 503
        now[0] += 1.5
        assert (await client.get("/lost")).status_code == 503
        for _ in range(2):
            assert (await client.get("/bug")).status_code == 500
    unavailable = [r for r in caplog.records if "503 unavailable" in r.getMessage()]
    assert len(unavailable) == 2
    assert unavailable[1].getMessage().endswith("(4 more like it left out)")
    internal = [r for r in caplog.records if "500 internal" in r.getMessage()]
    assert len(internal) == 2  # each with the request id its client was given
    assert [bool(r.exc_info) for r in internal] == [True, False]


async def test_a_commit_of_unknown_outcome_sends_the_client_to_the_primary(
    err_db: Database, admin: asyncpg.Connection[Any], db_name: str
) -> None:
    # It may have committed: read back from a replica, it would look as if it had not.
    async with err_db.connection() as conn:
        await conn.execute(SLOW_COMMIT)
    url = err_db.settings.dsn()
    db = Database(settings_for(url, replica_urls=[url]))  # any replica: the cookie is the point
    app = FastAPI()
    setup(app, db)

    @app.post("/slow")
    async def slow(conn: WriteTransaction) -> None:
        await conn.execute("INSERT INTO slow VALUES (1)")

    @app.get("/ready")
    async def ready() -> None:
        await db.ping()

    async with app.router.lifespan_context(app), asgi_client(app) as client:
        assert "set-cookie" not in (await client.get("/ready")).headers  # a probe wrote nothing
        killer = asyncio.create_task(kill_when_committing(admin, db_name))
        response = await client.post("/slow")
        await killer
    assert_clean_problem(response, 500, "commit_unknown")
    assert "pglayer_rw=1" in response.headers.get("set-cookie", "")


@pytest.mark.parametrize(
    ("pgbouncer_says", "said"),
    [
        (
            'role "ghost" does not exist',
            'a role does not exist (for the pooler at app@db:5432/x or behind it): role "ghost"',
        ),
        ('database "shop" does not exist', "the database of app@db:5432/x does not exist"),
        ("no such database: shop", "the database of app@db:5432/x does not exist"),
        ("unsupported startup parameter: options", "(unsupported startup parameter: options)"),
    ],
)
def test_a_poolers_refusal_in_words_is_explained(pgbouncer_says: str, said: str) -> None:
    # PgBouncer answers these with 08P01 and its own words: no SQLSTATE tells them apart.
    exc = asyncpg.ProtocolViolationError(pgbouncer_says)
    assert said in explain_connect_error(exc, "app@db:5432/x")


def test_a_refused_connection_names_every_limit_it_may_be() -> None:
    said = explain_connect_error(asyncpg.TooManyConnectionsError("too many"), "app@db:5432/x")
    assert "max_connections" in said
    assert "CONNECTION LIMIT of the role or the database" in said
