"""`pglayer.testing`: a user's project gets a migrated database per test and an app client."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from pglayer import testing
from tests.conftest import Server

APP = """
from fastapi import FastAPI
from pydantic import BaseModel

from pglayer import Database
from pglayer.fastapi import WriteTransaction, setup


class Note(BaseModel):
    body: str


def create_app(db: Database) -> FastAPI:
    app = FastAPI()
    setup(app, db)

    @app.post("/notes", status_code=201)
    async def add(note: Note, conn: WriteTransaction) -> dict[str, int]:
        sql = "INSERT INTO notes (body) VALUES ($1) RETURNING id"
        return {"id": await conn.fetchval(sql, note.body)}

    return app
"""

CONFTEST = """
import subprocess
import sys

import pytest

from app import create_app
from pglayer import Database

pytest_plugins = ["pglayer.testing"]


@pytest.fixture
def pglayer_app(pglayer_settings):
    return create_app(Database(pglayer_settings))
"""

TESTS = """
async def test_a_note_is_created(pglayer_client):
    response = await pglayer_client.post("/notes", json={"body": "hello"})
    assert response.status_code == 201
    assert response.json() == {"id": 1}


async def test_each_test_starts_from_the_migrated_template(pglayer_db):
    assert await pglayer_db.run(lambda conn: conn.fetchval("SELECT count(*) FROM notes")) == 0


def test_the_environments_replicas_are_not_the_tests(pglayer_settings):
    assert pglayer_settings.replica_urls == []
    assert pglayer_settings.reads_read_only  # a write through a read fails, as on a replica
"""


def test_a_project_gets_a_migrated_database_per_test(
    pytester: pytest.Pytester, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    schema = "CREATE TABLE notes (id bigserial PRIMARY KEY, body text NOT NULL);"
    pytester.makefile(".sql", **{"migrations/0001_notes": schema})
    pytester.makepyfile(app=APP, conftest=CONFTEST, test_notes=TESTS)
    pytester.makeini(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
        "pglayer_migrations = migrations\n"
    )
    monkeypatch.setenv("PGLAYER_TEST_DATABASE_URL", server.admin_url)
    # The app's production settings in the environment: its replica is not the test's clone.
    monkeypatch.setenv("PGLAYER_REPLICA_URLS", server.url_for("postgres"))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "error")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["pglayer: test databases migrated with */migrations"])


def test_two_migration_directories_of_one_name_take_the_histories_named(
    pytester: pytest.Pytester, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Both histories were "migrations": the second directory's 0001 was refused, and no
    # setting could name them apart.
    notes = "CREATE TABLE notes (id bigserial PRIMARY KEY, body text NOT NULL);"
    pytester.makefile(".sql", **{"notes/migrations/0001_notes": notes})
    pytester.makefile(".sql", **{"tags/migrations/0001_tags": "CREATE TABLE tags (name text);"})
    pytester.makepyfile(app=APP, conftest=CONFTEST, test_notes=TESTS)
    pytester.makeini(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
        "pglayer_migrations = notes/migrations tags/migrations\n"
        "pglayer_histories = notes tags\n"
    )
    monkeypatch.setenv("PGLAYER_TEST_DATABASE_URL", server.admin_url)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "error")
    result.assert_outcomes(passed=3)


def test_two_directories_of_one_name_without_histories_are_named_as_serve_names_them(
    pytester: pytest.Pytester, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Refused, where `pglayer serve --migrations` of the same two names the second by its
    # parent: the tests' histories were not the app's.
    schema = "CREATE TABLE notes (id bigserial PRIMARY KEY, body text);"
    pytester.makefile(".sql", **{"notes/migrations/0001_notes": schema})
    pytester.makefile(".sql", **{"tags/migrations/0001_tags": "CREATE TABLE tags (name text);"})
    pytester.makepyfile(app=APP, conftest=CONFTEST, test_notes=TESTS)
    pytester.makepyfile(
        test_histories="def test_histories(pglayer_migration_histories):\n"
        "    assert pglayer_migration_histories == ['migrations', 'tags/migrations']\n"
    )
    pytester.makeini(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
        "pglayer_migrations = notes/migrations tags/migrations\n"
    )
    monkeypatch.setenv("PGLAYER_TEST_DATABASE_URL", server.admin_url)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "error")
    result.assert_outcomes(passed=4)


@pytest.mark.parametrize(
    ("dirs", "said"),
    [
        ("migrations ./migrations", "*names one directory twice: *migrations and *migrations*"),
        ("migrations nowhere", "*pglayer_migrations: *nowhere is not a directory*"),
    ],
)
def test_a_migrations_directory_named_twice_or_missing_is_a_usage_error_naming_it(
    pytester: pytest.Pytester,
    server: Server,
    monkeypatch: pytest.MonkeyPatch,
    dirs: str,
    said: str,
) -> None:
    pytester.makefile(".sql", **{"migrations/0001_notes": "CREATE TABLE notes (body text);"})
    pytester.makepyfile(app=APP, conftest=CONFTEST, test_notes=TESTS)
    pytester.makeini(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
        f"pglayer_migrations = {dirs}\n"
    )
    monkeypatch.setenv("PGLAYER_TEST_DATABASE_URL", server.admin_url)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-k", "created")
    result.stdout.fnmatch_lines([said])


def test_a_project_without_its_migrations_named_is_told_in_the_header(
    pytester: pytest.Pytester,
) -> None:
    # Its tests failed as 500s, "relation ... does not exist" only in a captured log.
    pytester.makepyfile(app=APP, conftest=CONFTEST, test_notes=TESTS)
    pytester.makeini("[pytest]\nasyncio_mode = auto\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--collect-only")
    result.stdout.fnmatch_lines(["*pglayer_migrations is not set*"])


@pytest.mark.parametrize(
    "ini",
    [
        "asyncio_default_fixture_loop_scope = session\n",
        "asyncio_default_fixture_loop_scope = function\nasyncio_default_test_loop_scope = module\n",
    ],
)
def test_fixtures_and_tests_on_different_event_loops_are_refused_with_both_options_named(
    pytester: pytest.Pytester, server: Server, monkeypatch: pytest.MonkeyPatch, ini: str
) -> None:
    # The pool would be opened on one loop and used from another: every test a 500.
    pytester.makefile(".sql", **{"migrations/0001_notes": "CREATE TABLE notes (body text);"})
    pytester.makepyfile(app=APP, conftest=CONFTEST, test_notes=TESTS)
    pytester.makeini(f"[pytest]\nasyncio_mode = auto\n{ini}pglayer_migrations = migrations\n")
    monkeypatch.setenv("PGLAYER_TEST_DATABASE_URL", server.admin_url)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-k", "not replicas")
    result.assert_outcomes(errors=2, deselected=1)  # the two async tests; the sync one is not
    result.stdout.fnmatch_lines(
        ["*asyncio_default_fixture_loop_scope and asyncio_default_test_loop_scope*"]
    )


def test_without_the_testing_extra_the_import_error_names_it() -> None:
    # As without pytest installed: a None in sys.modules makes its import fail.
    code = "import sys; sys.modules['pytest_asyncio'] = None; import pglayer.testing"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 1
    assert "pip install 'pglayer[testing]'" in result.stderr


def _a_pid_that_has_ended() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    return int(proc.stdout)


async def _databases(server: Server, like: str) -> set[str]:
    conn: asyncpg.Connection[Any] = await asyncpg.connect(server.admin_url)
    try:
        return {
            r[0]
            for r in await conn.fetch("SELECT datname FROM pg_database WHERE datname LIKE $1", like)
        }
    finally:
        await conn.close()


async def test_a_failing_migration_leaves_no_template_behind(
    pytester: pytest.Pytester, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makefile(".sql", **{"migrations/0001_broken": "SELEC 1;"})
    pytester.makepyfile(app=APP, conftest=CONFTEST, test_notes=TESTS)
    pytester.makeini("[pytest]\nasyncio_mode = auto\npglayer_migrations = migrations\n")
    monkeypatch.setenv("PGLAYER_TEST_DATABASE_URL", server.admin_url)
    mine = "pglayer\\_tpl\\_%"
    before = await _databases(server, mine)
    result = await asyncio.to_thread(pytester.runpytest_subprocess, "-p", "no:cacheprovider")
    assert result.ret != 0
    assert "syntax error" in result.stdout.str()
    assert await _databases(server, mine) == before


async def test_a_session_drops_the_databases_of_sessions_that_ended_without_teardown(
    pytester: pytest.Pytester, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    ended = f"pglayer_t_{testing._HOST}_{_a_pid_that_has_ended()}_0123456789ab"
    running = f"pglayer_t_{testing._HOST}_{os.getpid()}_0123456789ab"  # this process: alive
    conn: asyncpg.Connection[Any] = await asyncpg.connect(server.admin_url)
    try:
        for name in (ended, running):
            await conn.execute(f'CREATE DATABASE "{name}"')
        pytester.makefile(".sql", **{"migrations/0001_notes": "CREATE TABLE notes (id int);"})
        one = "def test_one(pglayer_database_url):\n    assert pglayer_database_url\n"
        pytester.makepyfile(app=APP, conftest=CONFTEST, test_one=one)
        pytester.makeini("[pytest]\nasyncio_mode = auto\npglayer_migrations = migrations\n")
        monkeypatch.setenv("PGLAYER_TEST_DATABASE_URL", server.admin_url)
        result = await asyncio.to_thread(pytester.runpytest_subprocess, "-p", "no:cacheprovider")
        result.assert_outcomes(passed=1)
        left = await _databases(server, f"pglayer\\_t\\_{testing._HOST}\\_%")
        assert ended not in left
        assert running in left
    finally:
        for name in (ended, running):
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await conn.close()


async def test_the_databases_prefix_is_configurable(
    pytester: pytest.Pytester, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    ended = f"my_app_t_{testing._HOST}_{_a_pid_that_has_ended()}_0123456789ab"
    conn: asyncpg.Connection[Any] = await asyncpg.connect(server.admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{ended}"')
        pytester.makefile(".sql", **{"migrations/0001_notes": "CREATE TABLE notes (id int);"})
        mine = f"my_app_t_{testing._HOST}_"
        named = (
            "def test_named(pglayer_database_url):\n"
            f"    assert pglayer_database_url.rsplit('/', 1)[1].startswith({mine!r})\n"
        )
        pytester.makepyfile(app=APP, conftest=CONFTEST, test_named=named)
        pytester.makeini(
            "[pytest]\nasyncio_mode = auto\npglayer_migrations = migrations\n"
            "pglayer_database_prefix = my_app\n"
        )
        monkeypatch.setenv("PGLAYER_TEST_DATABASE_URL", server.admin_url)
        result = await asyncio.to_thread(pytester.runpytest_subprocess, "-p", "no:cacheprovider")
        result.assert_outcomes(passed=1)
        assert await _databases(server, "my\\_app\\_%") == set()  # the ended session's too
    finally:
        await conn.execute(f'DROP DATABASE IF EXISTS "{ended}"')
        await conn.close()


def test_a_session_removes_the_embedded_server_of_a_session_that_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    ended = tmp_path / "pglayer-testing-ended"
    (ended / "pg").mkdir(parents=True)
    dead = _a_pid_that_has_ended()
    (ended / "owner").write_text(f"{dead}.1.{testing._HOST}")
    ours = tmp_path / "pglayer-testing-ours"
    ours.mkdir()
    (ours / "owner").write_text(testing._me())
    # Another container's (another PID namespace): its PIDs say nothing here.
    elsewhere = tmp_path / "pglayer-testing-elsewhere"
    elsewhere.mkdir()
    (elsewhere / "owner").write_text(f"{dead}.1.0ther0")
    testing._sweep_abandoned_servers()
    assert not ended.exists()
    assert ours.exists()
    assert elsewhere.exists()
