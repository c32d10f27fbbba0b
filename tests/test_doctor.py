"""`pglayer doctor` against the test server, an unreachable address, and a real PgBouncer."""

from __future__ import annotations

import asyncio
import os
import uuid
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest

from pglayer._pooler import bounded_transaction, connect_plain
from pglayer._settings import default_application_name
from pglayer.testing import PgBouncer, PoolMode, pgbouncer_binary
from tests.conftest import Server, free_port, require_external, settings_for
from tests.test_cli import PGLAYER, clean_env, run_cli


def doctor(url: str, *args: str, **env: str) -> tuple[int, str]:
    result = run_cli(
        "doctor",
        *args,
        env=clean_env(**{"DATABASE_URL": url, "COLUMNS": "200", **env}),
        command=PGLAYER,
    )
    return result.returncode, result.stdout + result.stderr


def test_doctor_reports_a_healthy_direct_connection(db_url: str) -> None:
    code, out = doctor(db_url)
    assert code == 0, out
    assert "connected to" in out
    assert "PostgreSQL 1" in out
    assert "none: connected straight to PostgreSQL" in out
    assert "statement_cache_size=1024" in out


async def test_doctor_warns_of_an_app_that_connects_as_a_superuser(
    server: Server, admin: asyncpg.Connection[Any], db_name: str
) -> None:
    # A database's CONNECTION LIMIT did nothing for it: the operator could not tell why.
    code, out = doctor(server.url_for(db_name))
    assert code == 0, out  # a warning
    assert "a superuser" in out, out
    assert "CONNECTION LIMIT" in out, out
    role = f"r_{uuid.uuid4().hex[:12]}"
    await admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw'")
    try:
        parts = urlsplit(server.admin_url)
        url = f"postgresql://{role}:pw@{parts.hostname}:{parts.port}/{db_name}"
        code, out = doctor(url)
    finally:
        await admin.execute(f"DROP ROLE {role}")
    assert code == 0, out
    assert "a superuser" not in out, out


def test_doctor_takes_the_reserve_from_the_settings(db_url: str) -> None:
    code, out = doctor(db_url, PGLAYER_CONNECTION_RESERVE="0")
    assert code == 0, out
    assert "+ reserve 0 =" in out


def test_doctor_explains_an_unreachable_server_and_fails() -> None:
    code, out = doctor(f"postgresql://u:topsecret@127.0.0.1:{free_port()}/x")
    assert code == 1
    assert "nothing is listening" in out
    assert "topsecret" not in out


def test_doctor_fails_when_workers_times_pool_size_exceed_max_connections(db_url: str) -> None:
    code, out = doctor(db_url, "--workers", "50")
    assert code == 1
    assert "50 worker(s) x max_size 10" in out


@pytest.fixture
def bouncer_for() -> type[PgBouncer]:
    require_external(pgbouncer_binary() is not None, "pgbouncer is not installed")
    return PgBouncer


@pytest.mark.parametrize("mode", ["transaction", "session"])
def test_doctor_detects_pgbouncer_and_its_pool_mode(
    server: Server, db_name: str, bouncer_for: type[PgBouncer], mode: PoolMode
) -> None:
    with bouncer_for(server.admin_url, pool_mode=mode) as bouncer:
        code, out = doctor(bouncer.url(db_name), PGLAYER_STATEMENT_CACHE_SIZE="0")
    assert code == 0, out
    assert f"in {mode} mode" in out
    assert ("must hold 10 (workers x max_size)" in out) is (mode == "session")


def test_doctor_detects_pgbouncer_on_the_servers_own_port(
    server: Server, db_name: str, bouncer_for: type[PgBouncer]
) -> None:
    port = urlsplit(server.admin_url).port or 5432
    with bouncer_for(server.admin_url, host="127.0.0.2", port=port) as bouncer:
        code, out = doctor(bouncer.url(db_name), PGLAYER_STATEMENT_CACHE_SIZE="0")
    assert code == 0, out
    assert "in transaction mode" in out


def test_doctor_says_the_pooler_has_no_such_database(
    server: Server, bouncer_for: type[PgBouncer]
) -> None:
    with bouncer_for(server.admin_url, pool_mode="transaction") as bouncer:
        bouncer_url = bouncer.url("postgres")
        # A pooler with one database listed: any other name is none of its.
        code, out = doctor(bouncer_url.rsplit("/", 1)[0] + "/pgbouncer_nosuchdb")
    text = " ".join(out.split())
    assert code == 1, out
    assert "does not exist" in text or "has no such database" in text, out


def test_doctor_says_the_pooler_rejected_a_wrong_password(
    server: Server, db_name: str, bouncer_for: type[PgBouncer]
) -> None:
    with bouncer_for(server.admin_url, pool_mode="transaction") as bouncer:
        assert bouncer.password  # the pooler checks it (SCRAM)
        code, out = doctor(bouncer.url(db_name).replace(bouncer.password, "wrong", 1))
    assert code == 1, out
    assert "rejected the user or password" in " ".join(out.split()), out


@pytest.mark.parametrize("pooler", ["auto", "pgbouncer-transaction"])
def test_doctor_passes_where_the_pool_turns_prepared_statements_off_behind_pgbouncer(
    server: Server, db_name: str, bouncer_for: type[PgBouncer], pooler: str
) -> None:
    with bouncer_for(server.admin_url, pool_mode="transaction") as bouncer:
        code, out = doctor(bouncer.url(db_name), PGLAYER_POOLER=pooler)
    assert code == 0, out
    assert "the pool turns asyncpg's statement cache off" in out


def test_doctor_fails_when_prepared_statements_would_break_behind_pgbouncer(
    server: Server, db_name: str, bouncer_for: type[PgBouncer]
) -> None:
    # Told there is no pooler, the pool would keep its statement cache and break.
    with bouncer_for(server.admin_url, pool_mode="transaction") as bouncer:
        code, out = doctor(bouncer.url(db_name), PGLAYER_POOLER="none")
    assert code == 1, out
    assert "loses prepared statements" in out
    assert "PGLAYER_POOLER=none keeps them on" in out


def test_doctor_warns_that_a_transaction_pooler_drops_the_timeouts_and_says_how_to_set_them(
    server: Server, db_name: str, bouncer_for: type[PgBouncer]
) -> None:
    with bouncer_for(server.admin_url, pool_mode="transaction") as bouncer:
        code, out = doctor(bouncer.url(db_name), COLUMNS="500")
    assert code == 0, out  # a warning
    text = " ".join(out.split())
    assert "statement_timeout 0ms (configured 10s)" in text, out
    assert "SET statement_timeout = '10000ms'" in text, out
    assert f'IN DATABASE "{db_name}"' in text, out  # this database's, not the role's everywhere
    assert "statement_timeout=0s (the role's" in text, out
    assert f'IN DATABASE "{db_name}" SET jit = off' in text, out  # the server's default is on


async def test_doctor_finds_the_timeouts_set_on_the_role_behind_a_transaction_pooler(
    server: Server, db_name: str, bouncer_for: type[PgBouncer], admin: asyncpg.Connection[Any]
) -> None:
    role = await admin.fetchval("SELECT current_user")
    for name, value in (
        ("statement_timeout", "10s"),
        ("lock_timeout", "5s"),
        ("idle_in_transaction_session_timeout", "30s"),
        ("jit", "off"),
    ):  # for this test's database only
        await admin.execute(f'ALTER ROLE "{role}" IN DATABASE "{db_name}" SET {name} = \'{value}\'')
    with bouncer_for(server.admin_url, pool_mode="transaction") as bouncer:
        code, out = await asyncio.to_thread(doctor, bouncer.url(db_name))
    assert code == 0, out
    assert "the role's server-side timeouts are the configured ones" in " ".join(out.split())


async def test_doctor_is_not_cancelled_by_a_tiny_statement_timeout_on_the_database(
    db_url: str, db_name: str, admin: asyncpg.Connection[Any]
) -> None:
    # The misconfiguration it is there to report ended it with a traceback (57014).
    await admin.execute(f"ALTER DATABASE \"{db_name}\" SET statement_timeout = '1ms'")
    code, out = await asyncio.to_thread(doctor, db_url)
    assert code == 0, out
    assert "Traceback" not in out, out
    assert "none: connected straight to PostgreSQL" in out, out


async def test_doctor_says_the_statement_timeout_the_server_gets(db_url: str) -> None:
    # It said 0.0004s where the server gets 1 ms, the least that is not "none".
    code, out = await asyncio.to_thread(
        doctor, db_url, PGLAYER_STATEMENT_TIMEOUT="0.0004", COLUMNS="500"
    )
    assert code == 0, out
    assert "statement_timeout=0.001s" in " ".join(out.split()), out


async def test_a_checks_transaction_outlives_a_tiny_idle_in_transaction_timeout(
    db_url: str,
) -> None:
    conn = await connect_plain(db_url, settings_for(db_url))
    try:
        await conn.execute("SET idle_in_transaction_session_timeout = 1")
        async with bounded_transaction(conn, settings_for(db_url), readonly=True):
            await asyncio.sleep(0.05)  # a busy client's pause between two statements
            assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()


async def test_doctor_reports_a_tiny_statement_timeout_behind_a_transaction_pooler(
    server: Server, db_name: str, bouncer_for: type[PgBouncer], admin: asyncpg.Connection[Any]
) -> None:
    await admin.execute(f"ALTER DATABASE \"{db_name}\" SET statement_timeout = '1ms'")
    with bouncer_for(server.admin_url, pool_mode="transaction") as bouncer:
        code, out = await asyncio.to_thread(doctor, bouncer.url(db_name), COLUMNS="500")
    text = " ".join(out.split())
    assert code == 0, out  # a warning
    assert "statement_timeout 1ms (configured 10s)" in text, out


async def test_doctor_given_the_app_counts_its_connections_as_the_apps(db_url: str) -> None:
    served = ["uvicorn", "notesapp:app"]  # as the app's server was started, from here
    name = default_application_name(served, cwd=os.getcwd())
    conn = await asyncpg.connect(db_url, server_settings={"application_name": name})
    try:
        _, alone = await asyncio.to_thread(doctor, db_url)
        _, given = await asyncio.to_thread(doctor, db_url, "notesapp:app")
    finally:
        await conn.close()
    alone, given = " ".join(alone.split()), " ".join(given.split())
    assert "0 connection(s) are this app's" in alone, alone
    assert "run `pglayer doctor APP`" in alone, alone
    assert "1 connection(s) are this app's" in given, given
    assert "run `pglayer doctor APP`" not in given, given


async def test_doctor_warns_of_more_connections_than_its_workers_can_hold(db_url: str) -> None:
    # With the app under --workers 2 (12 connections open), it said "budget ok: 1 worker(s)".
    conns = [
        await asyncpg.connect(db_url, server_settings={"application_name": "notes-api"})
        for _ in range(3)
    ]
    try:
        _, out = await asyncio.to_thread(
            doctor, db_url, PGLAYER_APPLICATION_NAME="notes-api", PGLAYER_MAX_SIZE="2"
        )
    finally:
        for conn in conns:
            await conn.close()
    said = " ".join(out.split())
    assert "this app holds 3 connections, more than 1 worker(s) x max_size 2 can" in said, said


async def test_doctor_takes_an_app_in_another_database_for_another_app(
    server: Server, db_url: str
) -> None:
    # "An app on pglayer is connected under another name" of an app in another database.
    name = default_application_name(["uvicorn", "elsewhere:app"], cwd="/srv/elsewhere")
    other = await asyncpg.connect(server.admin_url, server_settings={"application_name": name})
    try:
        _, out = await asyncio.to_thread(doctor, db_url)
    finally:
        await other.close()
    said = " ".join(out.split())
    assert repr(name) in said, said  # listed, as another app's
    assert "run `pglayer doctor APP`" not in said
