"""`pglayer.testing`: a user's project gets a migrated database per test and an app client."""

from __future__ import annotations

import subprocess
import sys

import pytest

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


def test_without_the_testing_extra_the_import_error_names_it() -> None:
    # As without pytest installed: a None in sys.modules makes its import fail.
    code = "import sys; sys.modules['pytest_asyncio'] = None; import pglayer.testing"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 1
    assert "pip install 'pglayer[testing]'" in result.stderr
