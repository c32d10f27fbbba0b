"""Findings of the outside audit in the library's correctness (issue 13, items 1-8)."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest

from pglayer import (
    CommitIndeterminateError,
    ConfigurationError,
    ConnectionLostError,
    Database,
    TransientError,
    set_retry_testing,
)
from pglayer._budget import read_budget
from pglayer._embedded import EmbeddedPostgres
from pglayer._retry import is_retryable
from pglayer._settings import DatabaseSettings
from tests.conftest import (
    Server,
    destroy_cluster,
    free_port,
    make_cluster,
    server_env,
    settings_for,
    wait_for,
)

TABLE = "CREATE TABLE IF NOT EXISTS notes (id serial PRIMARY KEY, body text NOT NULL)"


async def _kill_own_backend(conn: Any, admin: asyncpg.Connection[Any]) -> None:
    pid = await conn.fetchval("SELECT pg_backend_pid()")
    await admin.execute("SELECT pg_terminate_backend($1)", pid)
    await asyncio.sleep(0.2)  # the driver sees the socket close before COMMIT is sent


async def test_a_connection_lost_before_commit_is_sent_is_replayed(
    db: Database, admin: asyncpg.Connection[Any], caplog: pytest.LogCaptureFixture
) -> None:
    await db.run(lambda conn: conn.execute(TABLE))
    attempts = 0

    async def body(conn: Any) -> int:
        nonlocal attempts
        attempts += 1
        await conn.execute("INSERT INTO notes (body) VALUES ('x')")
        if attempts == 1:
            await _kill_own_backend(conn, admin)
        return attempts

    set_retry_testing(True)
    try:
        assert await db.run_in_transaction(body) == 2
    finally:
        set_retry_testing(False)
    assert await db.run(lambda conn: conn.fetchval("SELECT count(*) FROM notes")) == 1
    assert "outcome unknown" not in caplog.text


async def test_a_connection_lost_before_commit_without_retry_is_a_lost_connection(
    db: Database, admin: asyncpg.Connection[Any]
) -> None:
    await db.run(lambda conn: conn.execute(TABLE))

    async def body(conn: Any) -> None:
        await conn.execute("INSERT INTO notes (body) VALUES ('x')")
        await _kill_own_backend(conn, admin)

    with pytest.raises(ConnectionLostError):
        await db.run_in_transaction(body, retry=False)
    assert await db.run(lambda conn: conn.fetchval("SELECT count(*) FROM notes")) == 0


def test_an_unknown_commit_outcome_is_not_transient() -> None:
    assert not issubclass(CommitIndeterminateError, TransientError)
    assert not is_retryable(CommitIndeterminateError())


def test_the_default_application_name_is_distinct_per_application() -> None:
    from pglayer._settings import default_application_name

    shop = default_application_name(["/v/bin/uvicorn", "shop.app:app"], "/srv/shop")
    billing = default_application_name(["/v/bin/uvicorn", "billing.main:app"], "/srv/billing")
    assert shop != billing
    assert shop.startswith("pglayer:")
    assert "shop.app" in shop
    assert len(shop.encode()) <= 63
    assert shop.isascii()
    assert shop.isprintable()
    assert DatabaseSettings(url="postgresql://h/d").application_name != "pglayer"


async def test_the_budget_counts_as_ours_only_this_databases_connections_not_the_asker(
    db_url: str, server: Server
) -> None:
    name = "pglayer:budget-test"
    settings = {"application_name": name}
    other = await asyncpg.connect(server.url_for("postgres"), server_settings=settings)
    mine = await asyncpg.connect(db_url, server_settings=settings)
    try:
        asking = await asyncpg.connect(db_url, server_settings=settings)  # as doctor's probe
        try:
            budget = await read_budget(
                asking, application_name=name, workers=1, max_size=1, reserve=0
            )
        finally:
            await asking.close()
    finally:
        await mine.close()
        await other.close()
    # `mine` only: the one in `postgres` belongs to another service, and the asking one is
    # left out (a doctor's probe is neither the app's nor another user's).
    assert budget.ours == 1
    assert budget.used_by_others >= 1


async def test_the_budget_counts_another_roles_connections_it_cannot_see_in_full(
    db_url: str, db_name: str, admin: asyncpg.Connection[Any]
) -> None:
    # Their `backend_type` is NULL to a role without pg_read_all_stats: a second app under
    # its own role was never counted, and the database's CONNECTION LIMIT always "fit".
    role = f"pglayer_plain_{uuid.uuid4().hex[:8]}"
    await admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'plain'")
    others = [await asyncpg.connect(db_url) for _ in range(3)]  # the superuser's: another app
    user, at = urlsplit(db_url).netloc.rsplit("@", 1)
    try:
        plain = await asyncpg.connect(db_url.replace(f"{user}@{at}", f"{role}:plain@{at}"))
        try:
            budget = await read_budget(
                plain, application_name="mine", workers=1, max_size=1, reserve=0
            )
        finally:
            await plain.close()
    finally:
        for conn in others:
            await conn.close()
        await admin.execute(f"DROP ROLE {role}")
    assert budget.used_by_others >= 3


@pytest.mark.parametrize(
    ("argv", "environ", "expected"),
    [
        (["/v/bin/uvicorn", "m:app", "--workers", "3"], {}, (3, "uvicorn --workers")),
        (["/v/uvicorn/__main__.py", "m:app", "--workers=2"], {}, (2, "uvicorn --workers")),
        (["/v/bin/gunicorn", "-w", "4", "m:app"], {}, (4, "gunicorn --workers")),
        (["/v/bin/gunicorn", "-w5", "m:app"], {}, (5, "gunicorn --workers")),
        (
            ["/v/bin/gunicorn", "m:app"],
            {"GUNICORN_CMD_ARGS": "--workers 6"},
            (6, "GUNICORN_CMD_ARGS"),
        ),
        (["/v/bin/uvicorn", "m:app"], {"UVICORN_WORKERS": "7"}, (7, "UVICORN_WORKERS")),
        (["/v/bin/uvicorn", "m:app"], {"WEB_CONCURRENCY": "8"}, (8, "WEB_CONCURRENCY")),
        (["/v/bin/uvicorn", "m:app"], {}, (1, "none detected; set PGLAYER_WORKERS")),
    ],
)
def test_workers_are_detected_from_the_server_command_line(
    argv: list[str], environ: dict[str, str], expected: tuple[int, str]
) -> None:
    from pglayer._settings import detect_workers

    assert detect_workers(argv, environ) == expected


def test_an_explicit_worker_count_wins_and_is_said() -> None:
    settings = DatabaseSettings(url="postgresql://h/d", workers=3)
    assert settings.worker_count() == (3, "PGLAYER_WORKERS, which `pglayer serve --workers` sets")


async def test_uvicorn_workers_are_counted_in_the_budget(db_url: str) -> None:
    # 2 x 100 + 5 exceed the test server's 200 connections; 1 x 100 + 5 would fit.
    env = server_env(
        db_url, PGLAYER_MAX_SIZE="100", PGLAYER_MIN_SIZE="1", PGLAYER_ON_BUDGET_EXCEEDED="refuse"
    )
    env.pop("WEB_CONCURRENCY", None)
    command = [
        sys.executable, "-m", "uvicorn", "--factory", "pglayer_shop.app:create_app",
        "--port", str(free_port()), "--workers", "2",
    ]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *command, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        output = b""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(30):
                while b"budget exceeded" not in output:
                    line = await proc.stdout.readline()  # type: ignore[union-attr]
                    if not line:
                        break
                    output += line
    finally:
        proc.terminate()  # our own child, by its PID
        await proc.wait()
    text = output.decode(errors="replace")
    assert "budget exceeded" in text, text[-2000:]
    assert "2 worker(s)" in text
    assert "uvicorn --workers" in text


async def test_doctor_counts_another_services_connections_in_another_database(
    db_url: str, server: Server
) -> None:
    from pglayer._doctor import diagnose

    name = "pglayer:doctor-test"
    others = [
        await asyncpg.connect(
            server.url_for("postgres"), server_settings={"application_name": name}
        )
        for _ in range(2)
    ]
    try:
        diagnosis = await diagnose(settings_for(db_url, application_name=name, workers=2))
    finally:
        for conn in others:
            await conn.close()
    budget = diagnosis.facts["budget"]
    assert budget["used_by_others"] >= 2
    assert budget["workers"] == 2
    details = {f.check: f.detail for f in diagnosis.findings}
    assert "2 worker(s)" in details["connection budget"]
    assert "PGLAYER_WORKERS" in details["connection budget"]
    assert f"2 by {name!r} in 'postgres'" in details["in use now"]


@pytest.fixture
def tiny_server() -> Iterator[EmbeddedPostgres]:
    cluster = make_cluster(
        "pglayer-tiny-",
        server_settings={"max_connections": "5", "superuser_reserved_connections": "0"},
    )
    cluster.start()
    try:
        yield cluster
    finally:
        destroy_cluster(cluster)


async def test_a_pool_opens_with_the_connections_it_can_get_and_fills_later(
    tiny_server: EmbeddedPostgres, caplog: pytest.LogCaptureFixture
) -> None:
    url = tiny_server.admin_url("postgres")
    held = [await asyncpg.connect(url) for _ in range(3)]  # 2 of 5 slots left
    settings = settings_for(url, min_size=4, max_size=4, on_budget_exceeded="ignore")
    try:
        async with Database(settings) as db:
            assert db.stats().size == 2
            assert "2 of min_size 4" in caplog.text
            assert await db.run(lambda conn: conn.fetchval("SELECT 1")) == 1
            for conn in held:
                await conn.close()
            held = []

            async def filled() -> bool:
                return db.stats().size == 4

            assert await wait_for(filled, timeout=10)
    finally:
        for conn in held:
            await conn.close()


@pytest.mark.parametrize("wait", [True, False])
async def test_a_missing_database_at_startup_is_said_in_words(server: Server, wait: bool) -> None:
    settings = settings_for(server.url_for("no_such_database"), startup_timeout=1.0)
    db = Database(settings)
    with pytest.raises(ConfigurationError) as caught:
        await db.open(wait=wait)
    await db.close()
    message = str(caught.value)
    assert "does not exist" in message
    assert "no_such_database" in message
    assert "database error" not in message


def test_every_setting_is_described() -> None:
    undescribed = [n for n, f in DatabaseSettings.model_fields.items() if not f.description]
    assert undescribed == []


async def test_a_client_that_leaves_mid_body_is_counted_as_499_not_500(db: Database) -> None:
    from fastapi import FastAPI

    from pglayer.fastapi import setup
    from pglayer.fastapi._metrics import setup_metrics

    app = FastAPI()
    setup(app, db)
    setup_metrics(app, db)

    @app.post("/things")
    async def things() -> None:
        raise AssertionError("never reached: the body did not arrive")

    messages: Iterator[dict[str, Any]] = iter(
        [{"type": "http.request", "body": b"{", "more_body": True}, {"type": "http.disconnect"}]
    )

    async def receive() -> dict[str, Any]:
        return next(messages)

    async def send(message: dict[str, Any]) -> None:
        raise AssertionError(f"nothing may be sent to a client that left: {message}")

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "path": "/things", "raw_path": b"/things", "query_string": b"", "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"10")],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "scheme": "http",
    }  # fmt: skip
    async with app.router.lifespan_context(app):
        await app(scope, receive, send)  # type: ignore[arg-type]
        stats = app.state.pglayer_request_stats.snapshot()
    assert [s.status for s in stats] == [499]
