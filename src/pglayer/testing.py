"""A pytest plugin for applications built on pglayer: a fresh, migrated database per test.

Enable it in your `conftest.py` with `pytest_plugins = ["pglayer.testing"]`, name your
migration directories in the pytest configuration, and define a `pglayer_app` fixture:

    [tool.pytest.ini_options]
    pglayer_migrations = ["migrations"]
    # pglayer_histories = ["billing", "notes"]  # one per directory, where two share a name

The server is `PGLAYER_TEST_DATABASE_URL` (a superuser URL) when set, else an embedded
PostgreSQL started once for the session (`pip install 'pglayer[embedded]'` where the machine
has no PostgreSQL). The migrations are applied once, to a template database; each test gets
`CREATE DATABASE ... TEMPLATE` of it, dropped afterwards; what a session stopped without
its teardown left behind is removed by the next session on the host.

The test databases are named `pglayer_t_...` and `pglayer_tpl_...`; `pglayer_database_prefix =
myapp` in the configuration names them `myapp_t_...`, to tell projects apart on one server.

Fixtures: `pglayer_server_url`, `pglayer_migration_dirs`, `pglayer_migration_histories`,
`pglayer_template`, `pglayer_database_url`, `pglayer_settings`, `pglayer_db` (an open
`Database`) and `pglayer_client` (an `httpx.AsyncClient` for your `pglayer_app`, its lifespan
running). Async fixtures need
pytest-asyncio (`pip install 'pglayer[testing]'`).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import socket
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg

try:
    import pytest
    import pytest_asyncio
except ImportError as exc:  # an extra: named, as every other one is
    raise ImportError(
        "pglayer.testing needs pytest and pytest-asyncio: pip install 'pglayer[testing]'"
    ) from exc

from pglayer._database import Database
from pglayer._pgbouncer import PgBouncer, PoolMode, pgbouncer_binary
from pglayer._settings import DatabaseSettings
from pglayer.migrations import (
    MigrationError,
    _given_twice,
    _qualified,
    install_pglayer_tables,
    load_migrations,
    migrate,
)

__all__ = ["PgBouncer", "PoolMode", "database_url_for", "pgbouncer_binary"]

_SERVER_ENV = "PGLAYER_TEST_DATABASE_URL"
_PREFIX = re.compile(r"[A-Za-z0-9_]{1,20}")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "pglayer_migrations",
        "Directories of SQL migrations applied to the test template, in order",
        type="paths",
        default=[],
    )
    parser.addini(
        "pglayer_histories",
        "The history of each pglayer_migrations directory, in turn (default: its name, as"
        " `pglayer migrate --dir` names it); needed where two directories share a name",
        type="args",
        default=[],
    )
    parser.addini(
        "pglayer_database_prefix",
        "How the names of the test databases begin (letters, digits, _; at most 20)",
        default="pglayer",
    )


def pytest_report_header(config: pytest.Config) -> str:
    """What the template gets: without `pglayer_migrations` only pglayer's tables, and an
    app's tests then failed as 500s with "relation ... does not exist" in a captured log."""
    directories = list(config.getini("pglayer_migrations"))
    if not directories:
        return "pglayer: test databases have pglayer's tables only: pglayer_migrations is not set"
    return "pglayer: test databases migrated with " + ", ".join(str(d) for d in directories)


_ASYNC_FIXTURES = ("pglayer_db", "pglayer_client")


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Refuse a test that would use the async fixtures from another event loop than the one
    they were made on (the pool's connections belong to that loop: every test would fail).
    Here, not at collection: a test deselected is never refused, and xdist's workers report
    it as a test's error."""
    if not any(name in getattr(item, "fixturenames", ()) for name in _ASYNC_FIXTURES):
        return
    marker = item.get_closest_marker("asyncio")  # async tests only
    if marker is None:
        return
    config = item.config
    fixtures = config.getini("asyncio_default_fixture_loop_scope") or "function"
    if fixtures == "fixture-scope":
        fixtures = "function"  # the scope of pglayer_db and pglayer_client
    default = config.getini("asyncio_default_test_loop_scope") or "function"
    test = marker.kwargs.get("loop_scope") or marker.kwargs.get("scope") or default
    if test != fixtures:
        pytest.fail(
            f"this test runs on a {test}-scoped event loop, but pglayer_db and pglayer_client"
            f" run on a {fixtures}-scoped one: set asyncio_default_fixture_loop_scope and"
            ' asyncio_default_test_loop_scope to the same scope ("function" for a database'
            " per test)",
            pytrace=False,
        )


def database_url_for(server_url: str, database: str) -> str:
    """`server_url` with its database replaced by `database`."""
    base, _, query = server_url.partition("?")
    url = base.rsplit("/", 1)[0] + f"/{database}"
    return f"{url}?{query}" if query else url


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def _admin(server_url: str, *statements: str) -> None:
    conn: asyncpg.Connection[Any] = await asyncpg.connect(server_url)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


# Sessions that end without their teardown (SIGTERM from a CI's cancel, SIGKILL) leave
# their server and databases behind: the names say which process made them, and the next
# session removes those of processes that have ended.
_SERVER_DIR_PREFIX = "pglayer-testing-"
_OWNER = "owner"


def _pid_namespace() -> str:
    """This process's PID namespace (Linux), so that sessions in two containers sharing a
    host name, `/tmp` or a server never take each other's live processes for ended ones."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


_HOST = hashlib.sha256(f"{socket.gethostname()} {_pid_namespace()}".encode()).hexdigest()[:6]


def _me() -> str:
    from pglayer._embedded import _started  # POSIX only: the server URL alone works anywhere

    pid = os.getpid()
    return f"{pid}.{_started(pid)}.{_HOST}"


def _sweep_abandoned_servers() -> None:
    from pglayer._embedded import EmbeddedPostgres, _still_running

    for base in Path(tempfile.gettempdir()).glob(f"{_SERVER_DIR_PREFIX}*"):
        try:
            owner = (base / _OWNER).read_text()
        except OSError:
            continue  # another program's, or a session's that has not written it yet
        if owner.rpartition(".")[2] == _HOST and not _still_running(owner):
            EmbeddedPostgres(base, database="postgres", fast_unsafe=True).destroy()
            shutil.rmtree(base, ignore_errors=True)


async def _drop_abandoned_databases(server_url: str, prefix: str) -> None:
    from pglayer._process import alive

    conn: asyncpg.Connection[Any] = await asyncpg.connect(server_url)
    escaped = prefix.replace("_", "\\_")
    try:
        names = await conn.fetch(
            "SELECT datname FROM pg_database WHERE datname LIKE $1 OR datname LIKE $2",
            f"{escaped}\\_t\\_{_HOST}\\_%",
            f"{escaped}\\_tpl\\_{_HOST}\\_%",
        )
        for (name,) in names:
            pid = name.rsplit("_", 2)[1]  # {prefix}_t_{host}_{pid}_{random}
            if pid.isdigit() and not alive(int(pid)):
                await conn.execute(f"DROP DATABASE IF EXISTS {_quoted(name)} WITH (FORCE)")
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def pglayer_server_url() -> Iterator[str]:
    """A superuser URL: `PGLAYER_TEST_DATABASE_URL`, else an embedded server for the session."""
    url = os.environ.get(_SERVER_ENV)
    if url:
        yield url
        return
    from pglayer._embedded import EmbeddedPostgres

    _sweep_abandoned_servers()
    base = Path(tempfile.mkdtemp(prefix=_SERVER_DIR_PREFIX))
    base.chmod(0o755)  # the unprivileged server user must reach it
    (base / _OWNER).write_text(_me())
    cluster = EmbeddedPostgres(base, database="postgres", fast_unsafe=True)
    try:
        cluster.start()
        yield cluster.admin_url("postgres")
    finally:
        cluster.destroy()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def pglayer_migration_dirs(pytestconfig: pytest.Config) -> list[Path]:
    """The directories named by `pglayer_migrations`; override to choose them in code."""
    return list(pytestconfig.getini("pglayer_migrations"))


@pytest.fixture(scope="session")
def pglayer_migration_histories(
    pytestconfig: pytest.Config, pglayer_migration_dirs: list[Path]
) -> list[str]:
    """The history of each directory: `pglayer_histories` in turn, else each one's name, as
    `pglayer serve` names them in one run (a second of one name with its parent's too)."""
    _refuse_missing_or_twice(pglayer_migration_dirs)
    names = [str(name) for name in pytestconfig.getini("pglayer_histories")]
    if not names:
        return _histories_by_name(pglayer_migration_dirs)
    if len(names) != len(pglayer_migration_dirs):
        raise pytest.UsageError(
            f"pglayer_histories names {len(names)} histories for"
            f" {len(pglayer_migration_dirs)} pglayer_migrations directories: one each, in turn"
        )
    return names


def _refuse_missing_or_twice(directories: list[Path]) -> None:
    """A directory that is not one, or one named twice (its files would run twice), as a
    usage error that names it."""
    for directory in directories:
        if not Path(directory).is_dir():
            raise pytest.UsageError(f"pglayer_migrations: {directory} is not a directory")
    twice = _given_twice(directories)
    if twice is not None:
        raise pytest.UsageError(
            f"pglayer_migrations names one directory twice: {twice[0]} and {twice[1]}"
        )


def _histories_by_name(directories: list[Path]) -> list[str]:
    """Each directory's name; a second of one name, its parent's and its own."""
    names: list[str] = []
    for directory in directories:
        name = Path(os.path.abspath(directory)).name
        if name in names:
            name = _qualified(directory) or name
        if name in names:
            raise pytest.UsageError(
                f"pglayer_migrations: two directories would share history {name!r}: name"
                " each one's with pglayer_histories"
            )
        names.append(name)
    return names


@pytest.fixture(scope="session")
def pglayer_database_prefix(pytestconfig: pytest.Config) -> str:
    """How the test databases' names begin: `pglayer_database_prefix` (default `pglayer`)."""
    prefix = str(pytestconfig.getini("pglayer_database_prefix"))
    if not _PREFIX.fullmatch(prefix):
        raise pytest.UsageError(
            f"pglayer_database_prefix {prefix!r}: use letters, digits and _, at most 20"
        )
    return prefix


@pytest.fixture(scope="session")
def pglayer_template(
    pglayer_server_url: str,
    pglayer_migration_dirs: list[Path],
    pglayer_migration_histories: list[str],
    pglayer_database_prefix: str,
) -> Iterator[str]:
    """A database with every migration applied, cloned by each test."""
    name = f"{pglayer_database_prefix}_tpl_{_HOST}_{os.getpid()}_{uuid.uuid4().hex[:6]}"

    async def build() -> None:
        await _drop_abandoned_databases(pglayer_server_url, pglayer_database_prefix)
        await _admin(pglayer_server_url, f"CREATE DATABASE {_quoted(name)}")
        settings = DatabaseSettings(
            url=database_url_for(pglayer_server_url, name), min_size=1, max_size=1
        )
        async with Database(settings) as db:
            await install_pglayer_tables(db)
            for directory, history in zip(
                pglayer_migration_dirs, pglayer_migration_histories, strict=True
            ):
                try:
                    await migrate(db, load_migrations(directory), history=history)
                except MigrationError as exc:
                    # Its advice names the CLI's option and migrate()'s: here it is an ini's.
                    raise MigrationError(
                        f"{exc} (in the pytest configuration, histories are named by"
                        " `pglayer_histories`, one per `pglayer_migrations` directory)"
                    ) from None

    try:
        asyncio.run(build())  # a migration that fails leaves no template behind either
        yield name
    finally:
        drop = f"DROP DATABASE IF EXISTS {_quoted(name)} WITH (FORCE)"
        asyncio.run(_admin(pglayer_server_url, drop))


@pytest.fixture
def pglayer_database_url(
    pglayer_server_url: str, pglayer_template: str, pglayer_database_prefix: str
) -> Iterator[str]:
    """The URL of a database of this test's own, cloned from the template."""
    name = f"{pglayer_database_prefix}_t_{_HOST}_{os.getpid()}_{uuid.uuid4().hex[:12]}"
    create = f"CREATE DATABASE {_quoted(name)} TEMPLATE {_quoted(pglayer_template)}"
    asyncio.run(_admin(pglayer_server_url, create))
    try:
        yield database_url_for(pglayer_server_url, name)
    finally:
        drop = f"DROP DATABASE IF EXISTS {_quoted(name)} WITH (FORCE)"
        asyncio.run(_admin(pglayer_server_url, drop))


@pytest.fixture
def pglayer_settings(pglayer_database_url: str) -> DatabaseSettings:
    """Settings for the test's database: a small pool that must open at once, reads in READ
    ONLY transactions. The rest comes from the environment, but never replicas: they would
    serve the app's reads from another database than the test's."""
    return DatabaseSettings(
        url=pglayer_database_url,
        min_size=1,
        max_size=4,
        require_on_startup=True,
        application_name="pglayer-testing",
        replica_urls=[],
        reads_read_only=True,  # a write through a read fails here as it would on a replica
    )


@pytest_asyncio.fixture
async def pglayer_db(pglayer_settings: DatabaseSettings) -> AsyncIterator[Database]:
    """An open `Database` on the test's database."""
    async with Database(pglayer_settings) as db:
        yield db


@pytest_asyncio.fixture
async def pglayer_client(pglayer_app: Any) -> AsyncIterator[Any]:
    """An `httpx.AsyncClient` for your `pglayer_app` fixture, with its lifespan running."""
    import httpx

    app = pglayer_app
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://testserver") as client,
    ):
        yield client
