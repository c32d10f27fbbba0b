"""Test harness: a real PostgreSQL, a migrated template database, and a fresh clone per test.

The server is `PGLAYER_TEST_DATABASE_URL` if set (a superuser URL), else an embedded cluster
started for the session (fsync off). Each test gets `CREATE DATABASE ... TEMPLATE` of a
database migrated once, dropped afterwards: full isolation, and `pg_stat_activity` can be
read per test database.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import types
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from pglayer_shop.app import create_app
from pglayer_shop.schema import apply_migrations
from pglayer_shop.settings import ShopSettings

from pglayer import ConfigurationError, Database, DatabaseSettings, _logs
from pglayer._embedded import EmbeddedPostgres
from pglayer._logs import Throttle
from pglayer.testing import PgBouncer, pgbouncer_binary

pytest_plugins = ["pytester"]

REQUIRE_EXTERNAL = os.environ.get("PGLAYER_REQUIRE_EXTERNAL") == "1"


def require_external(available: bool, reason: str) -> None:
    """Skip when an external binary or server is missing; fail instead in CI."""
    if available:
        return
    if REQUIRE_EXTERNAL:
        pytest.fail(f"PGLAYER_REQUIRE_EXTERNAL=1 but {reason}")
    pytest.skip(reason)


@dataclass
class Server:
    admin_url: str  # superuser, database `postgres`
    cluster: EmbeddedPostgres | None

    def url_for(self, database: str) -> str:
        return self.admin_url.rsplit("/", 1)[0] + f"/{database}"


def make_cluster(prefix: str, **kwargs: Any) -> EmbeddedPostgres:
    """A throwaway cluster in a directory the unprivileged server user can reach."""
    base = Path(tempfile.mkdtemp(prefix=prefix))
    base.chmod(0o755)
    return EmbeddedPostgres(base, database="postgres", fast_unsafe=True, **kwargs)


def destroy_cluster(cluster: EmbeddedPostgres) -> None:
    cluster.destroy()
    shutil.rmtree(cluster.base_dir, ignore_errors=True)


@pytest.fixture(autouse=True)
def _lines_not_throttled() -> None:
    """Each test sees the first of each throttled log line (see `Throttle`)."""
    Throttle.forget_all()


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    url = os.environ.get("PGLAYER_TEST_DATABASE_URL")
    if url:
        yield Server(admin_url=url, cluster=None)
        return
    cluster = make_cluster("pglayer-test-")
    cluster.start()
    try:
        yield Server(admin_url=cluster.admin_url("postgres"), cluster=cluster)
    finally:
        destroy_cluster(cluster)


@pytest.fixture(scope="session")
async def admin(server: Server) -> AsyncIterator[asyncpg.Connection[Any]]:
    conn: asyncpg.Connection[Any] = await asyncpg.connect(server.admin_url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture(scope="session")
async def template(server: Server, admin: asyncpg.Connection[Any]) -> AsyncIterator[str]:
    name = f"pglayer_tpl_{os.getpid()}"
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
    await admin.execute(f'CREATE DATABASE "{name}"')
    settings = DatabaseSettings(url=server.url_for(name), min_size=1, max_size=1)
    async with Database(settings) as db:
        await apply_migrations(db)
    try:
        yield name
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.asynccontextmanager
async def empty_database(server: Server, admin: asyncpg.Connection[Any]) -> AsyncIterator[str]:
    """The URL of a new database without any schema, dropped afterwards."""
    name = f"e_{uuid.uuid4().hex[:16]}"
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield server.url_for(name)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def empty_db_url(server: Server, admin: asyncpg.Connection[Any]) -> AsyncIterator[str]:
    async with empty_database(server, admin) as url:
        yield url


@pytest.fixture
async def db_name(admin: asyncpg.Connection[Any], template: str) -> AsyncIterator[str]:
    name = f"t_{uuid.uuid4().hex[:16]}"
    await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    try:
        yield name
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def tx_bouncer(server: Server) -> Iterator[PgBouncer]:
    """A real PgBouncer in transaction mode, three server connections for all its clients."""
    require_external(pgbouncer_binary() is not None, "pgbouncer is not installed")
    with PgBouncer(server.admin_url, pool_mode="transaction", pool_size=3) as b:
        yield b


@pytest.fixture
def db_url(server: Server, db_name: str) -> str:
    return server.url_for(db_name)


def settings_for(url: str, **overrides: Any) -> DatabaseSettings:
    values: dict[str, Any] = {
        "url": url,
        "min_size": 1,
        "max_size": 4,
        "acquire_timeout": 2.0,
        "application_name": "pglayer-test",
        "require_on_startup": True,
        "startup_timeout": 5.0,
    }
    values.update(overrides)
    return DatabaseSettings(**values)


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    async with Database(settings_for(db_url)) as database:
        yield database


async def backends(admin: asyncpg.Connection[Any], database: str) -> list[dict[str, Any]]:
    """Client backends connected to `database`, as pg_stat_activity shows them."""
    rows = await admin.fetch(
        """
        SELECT pid, state, query, application_name FROM pg_stat_activity
        WHERE datname = $1 AND backend_type = 'client backend' AND pid <> pg_backend_pid()
        """,
        database,
    )
    return [dict(r) for r in rows]


async def wait_for(predicate: Any, timeout: float = 5.0, interval: float = 0.05) -> Any:
    """Poll an async predicate until it returns a truthy value; return that value."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await predicate()
        if value or loop.time() > deadline:
            return value
        await asyncio.sleep(interval)


@pytest.fixture
def shop_settings() -> ShopSettings:
    return ShopSettings(admin_token=None)


@pytest.fixture
async def app(db: Database, shop_settings: ShopSettings) -> AsyncIterator[FastAPI]:
    application = create_app(db=db, settings=shop_settings)
    async with application.router.lifespan_context(application):
        yield application


def asgi_client(application: FastAPI) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=application, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://shop.test")


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(app) as c:
        yield c


def logs_clock(monkeypatch: pytest.MonkeyPatch, start: float) -> list[float]:
    """Hold the log throttles' clock at `now[0]`, returned to move it: `pglayer._logs`'s
    alone, as the suite's shared event loop keeps reading the real one (turned back, it
    left the loop's clock waiting for that moment to come again)."""
    now = [start]
    fake = types.ModuleType("time")
    fake.__dict__.update(time.__dict__)
    fake.monotonic = lambda: now[0]  # type: ignore[attr-defined]
    monkeypatch.setattr(_logs, "time", fake)
    return now


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveServer:
    """A real uvicorn server for `application`, in this event loop, on a free port."""

    def __init__(
        self,
        application: FastAPI,
        *,
        http: str = "auto",
        ws: str = "auto",
        timeout_keep_alive: int = 5,
    ) -> None:
        self.port = free_port()
        config = uvicorn.Config(
            application,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="off",
            http=http,
            ws=ws,
            timeout_keep_alive=timeout_keep_alive,
        )
        self.server = uvicorn.Server(config)
        self.url = f"http://127.0.0.1:{self.port}"
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> LiveServer:
        self._task = asyncio.create_task(self.server.serve())
        while not self.server.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.01)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.should_exit = True
        assert self._task is not None
        await self._task


class ServerProcess:
    """An app factory served by uvicorn in a separate process (uvloop, httptools)."""

    def __init__(self, factory: str, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._factory = factory
        self._env = env
        self._proc: Any = None

    async def __aenter__(self) -> ServerProcess:
        self._proc = subprocess.Popen(  # noqa: ASYNC220  (starts at once; we poll it below)
            [
                sys.executable, "-m", "uvicorn", "--factory", self._factory,
                "--host", "127.0.0.1", "--port", str(self.port),
                "--loop", "uvloop", "--http", "httptools", "--log-level", "warning",
                "--backlog", "4096",
            ],
            env=self._env,
            cwd=str(Path(__file__).parent.parent),
        )  # fmt: skip
        async with httpx.AsyncClient() as client:
            for _ in range(300):
                if self._proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self._proc.returncode}")
                try:
                    if (await client.get(f"{self.url}/health/live")).status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.05)
        raise RuntimeError("server did not start")

    async def __aexit__(self, *exc: object) -> None:
        self._proc.send_signal(signal.SIGTERM)  # our own child, by its PID
        await asyncio.to_thread(self._proc.wait, 30)


def server_env(db_url: str, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGLAYER_")}
    env["DATABASE_URL"] = db_url
    env.update(settings)
    return env


def children_of(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux's /proc)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            stat = (proc / "stat").read_text() if proc.name.isdigit() else ""
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and fields[1] == str(pid):
            found.append(int(proc.name))
    return found


async def refuses_to_start(app: Any, match: str) -> None:
    """Assert that `app`'s lifespan refuses to start with a `ConfigurationError` matching."""
    with pytest.raises(ConfigurationError, match=match):
        async with app.router.lifespan_context(app):
            pass
