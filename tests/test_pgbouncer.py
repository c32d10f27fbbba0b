"""Through a real PgBouncer (Debian's 1.18): transaction and session mode, PAUSE, restarts."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest
from pglayer_shop.app import create_app
from pglayer_shop.settings import ShopSettings

from pglayer import ConfigurationError, Database, PglayerError
from pglayer._doctor import diagnose
from pglayer._pooler import detect_pooler
from pglayer.migrations import migrate
from pglayer.testing import PgBouncer, PoolMode, pgbouncer_binary
from tests.conftest import Server, asgi_client, require_external, settings_for
from tests.test_fastapi_integration import _ready
from tests.test_shop_orders import funded_user, make_product


@pytest.fixture(params=["transaction", "session"])
def bouncer(request: pytest.FixtureRequest, server: Server) -> Iterator[PgBouncer]:
    require_external(pgbouncer_binary() is not None, "pgbouncer is not installed")
    mode: PoolMode = request.param
    # Session pooling pins a server connection per client connection: it needs as many
    # as the pool may open (8 below). Transaction pooling shares 3 among them.
    with PgBouncer(
        server.admin_url, pool_mode=mode, pool_size=3 if mode == "transaction" else 10
    ) as b:
        yield b


@asynccontextmanager
async def shop_through(bouncer: PgBouncer, db_name: str) -> AsyncIterator[httpx.AsyncClient]:
    db = Database(settings_for(bouncer.url(db_name), min_size=2, max_size=8))
    app = create_app(db=db, settings=ShopSettings())
    async with app.router.lifespan_context(app), asgi_client(app) as client:
        yield client


@pytest.fixture
async def bouncer_client(bouncer: PgBouncer, db_name: str) -> AsyncIterator[httpx.AsyncClient]:
    async with shop_through(bouncer, db_name) as client:
        yield client


async def console(bouncer: PgBouncer, command: str) -> None:
    conn = await asyncpg.connect(bouncer.url("pgbouncer"), statement_cache_size=0)
    try:
        # The admin console speaks the simple protocol only, which execute() without
        # arguments uses.
        await conn.execute(command, timeout=10)
    finally:
        await conn.close()


async def test_the_pooler_is_detected_and_prepared_statements_follow_it(
    bouncer: PgBouncer, db_name: str
) -> None:
    async with Database(settings_for(bouncer.url(db_name))) as db:
        assert db.pooler is not None
        assert db.pooler.mode == bouncer.pool_mode
        # Debian's 1.18 loses named statements across transactions; session mode keeps them.
        assert db.pooler.prepared_statements is (bouncer.pool_mode == "session")


async def test_a_pooler_on_the_servers_own_port_is_detected(server: Server, db_name: str) -> None:
    # Production's usual layout (pgbouncer:5432 in front of postgres:5432): the server's port
    # says nothing, the backend the login named does.
    require_external(pgbouncer_binary() is not None, "pgbouncer is not installed")
    port = urlsplit(server.admin_url).port or 5432
    with PgBouncer(server.admin_url, pool_size=3, host="127.0.0.2", port=port) as bouncer:
        async with Database(settings_for(bouncer.url(db_name))) as db:
            assert db.pooler is not None
            assert db.pooler.mode == "transaction"
            assert db.pooler.prepared_statements is False


async def test_a_statement_mode_pooler_is_refused_at_open(server: Server, db_name: str) -> None:
    require_external(pgbouncer_binary() is not None, "pgbouncer is not installed")
    with (
        PgBouncer(server.admin_url, pool_mode="statement", pool_size=3) as bouncer,
        pytest.raises(ConfigurationError, match="statement mode, where transactions"),
    ):
        async with Database(settings_for(bouncer.url(db_name))):
            pass


async def test_detection_holds_while_other_clients_probe_the_pooler_at_once(
    tx_bouncer: PgBouncer, db_name: str
) -> None:
    # Several workers start together: each one's probes share the pooler's few server
    # connections with the others', which must not make any of them see session mode or
    # prepared statements that survive.
    settings = settings_for(tx_bouncer.url(db_name))
    for _ in range(3):
        found = await asyncio.gather(*(detect_pooler(settings) for _ in range(6)))
        assert Counter((f.mode, f.prepared_statements) for f in found) == {
            ("transaction", False): 6
        }


async def test_detection_ignores_statements_other_clients_left_on_the_server_connection(
    server: Server, db_name: str
) -> None:
    require_external(pgbouncer_binary() is not None, "pgbouncer is not installed")
    with PgBouncer(server.admin_url, pool_mode="transaction", pool_size=1) as bouncer:
        other = await asyncpg.connect(bouncer.url(db_name))
        try:
            # Another process's asyncpg (another worker's probe) named its statements from
            # its own counter: the names this process's next ones will have.
            start = asyncpg.connection._uid  # type: ignore[attr-defined]
            async with other.transaction():  # left on the pooler's one server connection
                for n in range(start + 1, start + 20):
                    await other.execute(f'PREPARE "__asyncpg_stmt_{n:x}__" AS SELECT 1')
            found = await detect_pooler(settings_for(bouncer.url(db_name)))
        finally:
            await other.close()
    assert (found.mode, found.prepared_statements) == ("transaction", False)


async def test_a_replica_is_probed_whatever_the_primarys_pooler_is_said_to_be(
    tx_bouncer: PgBouncer, db_name: str, db_url: str
) -> None:
    settings = settings_for(
        tx_bouncer.url(db_name), pooler="pgbouncer-transaction", replica_urls=[db_url]
    )
    async with Database(settings) as db:
        assert db.pooler is not None
        assert db.replicas is not None
        assert db.pooler.mode == "transaction"
        replica = db.replicas.replicas[0]
        assert replica.pooler is not None
        assert replica.pooler.mode == "none"
        async with replica.connection() as conn:  # its own timeouts are sent at connect
            assert await conn.fetchval("SELECT current_setting('statement_timeout')") == "10s"


async def test_a_write_the_pooler_never_started_is_not_called_indeterminate(
    server: Server, admin: asyncpg.Connection[Any], db_name: str, db_url: str
) -> None:
    require_external(pgbouncer_binary() is not None, "pgbouncer is not installed")
    role = f"r_{uuid.uuid4().hex[:12]}"
    await admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw'")
    owner = await asyncpg.connect(db_url)
    try:
        await owner.execute(f"CREATE TABLE writes (x int); GRANT INSERT ON writes TO {role}")
        parts = urlsplit(server.admin_url)
        server_url = f"postgresql://{role}:pw@{parts.hostname}:{parts.port}/postgres"
        with PgBouncer(server_url, pool_mode="transaction", pool_size=2) as bouncer:
            settings = settings_for(bouncer.url(db_name), max_size=1, query_timeout=2.0)
            async with Database(settings) as db:

                async def write() -> str:
                    return await db.run(
                        lambda c: c.execute("INSERT INTO writes VALUES ($1)", 1),
                        lock_timeout=1.0,
                        retry=False,
                    )

                await write()
                # The pooler can no longer log in: it holds the statement's Parse, then
                # refuses it (server_login_retry); neither ever reached the server.
                await admin.execute(f"ALTER ROLE {role} NOLOGIN")
                await admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1",
                    role,
                )
                errors = []
                for _ in range(2):
                    with pytest.raises(PglayerError) as caught:
                        await write()
                    errors.append(type(caught.value).__name__)
        assert "CommitIndeterminateError" not in errors, errors
        assert await owner.fetchval("SELECT count(*) FROM writes") == 1
    finally:
        await owner.execute("DROP TABLE IF EXISTS writes")
        await owner.close()
        await admin.execute(f"DROP ROLE {role}")


async def test_the_shop_works_through_pgbouncer(bouncer_client: httpx.AsyncClient) -> None:
    client = bouncer_client
    user = await funded_user(client, f"pgb-{id(client)}@example.com", "100.00")
    product = await make_product(client, "10.00", 5)
    headers = {"Idempotency-Key": "pgb-1"}
    body = {"user_id": user, "product_id": product, "quantity": 2}
    first = await client.post("/orders", json=body, headers=headers)
    again = await client.post("/orders", json=body, headers=headers)
    assert first.status_code == 201, first.text
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    assert (await client.get(f"/accounts/{user}")).json()["balance"] == "80.00"
    dashboard = await client.get(f"/dashboard/{user}")
    assert dashboard.status_code == 200
    assert [o["id"] for o in dashboard.json()["recent_orders"]] == [first.json()["id"]]
    assert (await client.get("/users", params={"limit": 1})).status_code == 200


async def load(client: httpx.AsyncClient, seconds: float, workers: int = 16) -> Counter[int]:
    statuses: Counter[int] = Counter()
    loop = asyncio.get_running_loop()
    stop = loop.time() + seconds

    async def one(i: int) -> None:
        n = 0
        while loop.time() < stop and n < 2000:
            n += 1
            response = await client.get(f"/users/{1 + (i + n) % 3}")
            statuses[response.status_code] += 1

    await asyncio.gather(*(one(i) for i in range(workers)))
    return statuses


async def seed_users(client: httpx.AsyncClient) -> None:
    for i in range(3):
        response = await client.post(
            "/users", json={"name": f"U{i}", "email": f"load{i}@example.com"}
        )
        assert response.status_code == 201


async def test_concurrent_load_has_no_errors(bouncer_client: httpx.AsyncClient) -> None:
    await seed_users(bouncer_client)
    statuses = await load(bouncer_client, 1.5)
    assert set(statuses) == {200}
    assert statuses[200] > 100


async def test_pause_and_resume_under_load_lose_nothing(
    tx_bouncer: PgBouncer, db_name: str
) -> None:
    # Transaction mode only: in session mode PAUSE waits for every client to disconnect.
    async with shop_through(tx_bouncer, db_name) as client:
        await seed_users(client)

        async def pause_then_resume() -> None:
            await asyncio.sleep(0.3)
            await console(tx_bouncer, "PAUSE")
            await asyncio.sleep(0.5)
            await console(tx_bouncer, "RESUME")

        statuses, _ = await asyncio.gather(load(client, 2.0), pause_then_resume())
    assert set(statuses) == {200}


async def test_reconnect_and_a_restart_give_only_503s_then_recover(
    bouncer: PgBouncer, bouncer_client: httpx.AsyncClient
) -> None:
    await seed_users(bouncer_client)

    async def disrupt() -> None:
        await asyncio.sleep(0.3)
        await console(bouncer, "RECONNECT")
        await asyncio.sleep(0.3)
        await asyncio.to_thread(bouncer.stop)
        await asyncio.sleep(0.4)
        await asyncio.to_thread(bouncer.start)

    statuses, _ = await asyncio.gather(load(bouncer_client, 2.5), disrupt())
    assert set(statuses) <= {200, 503}, statuses
    after = await load(bouncer_client, 0.5, workers=4)
    assert set(after) == {200}


async def test_a_pooler_told_wrong_loses_prepared_statements_once_and_the_cache_goes_off(
    tx_bouncer: PgBouncer, db_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Told "session" while PgBouncer pools transactions (or its mode changed since open), the
    # statement cache starts on: a statement prepared on one server connection and run on
    # another was a 500 for good (26000); the first such loss turns the cache off.
    caplog.set_level(logging.WARNING, logger="pglayer")
    settings = settings_for(
        tx_bouncer.url(db_name), pooler="pgbouncer-session", max_size=8, retry_attempts=1
    )
    failures = 0
    async with Database(settings) as db:

        async def query(i: int) -> Any:
            return await db.run(lambda c: c.fetchval("SELECT $1::int", i), retry=False)

        for _ in range(5):
            results = await asyncio.gather(*(query(i) for i in range(200)), return_exceptions=True)
            failures += sum(isinstance(r, BaseException) for r in results)
    assert failures == 0
    lost = [r for r in caplog.records if "prepared statements are lost" in r.getMessage()]
    assert len(lost) == 1, [r.getMessage() for r in caplog.records]


async def test_transactions_that_lose_prepared_statements_to_the_pooler_are_replayed(
    tx_bouncer: PgBouncer, db_name: str
) -> None:
    # Inside a transaction the lost statement aborted it: a 500 for each one in flight when
    # the cache went off, unless the transaction is replayed.
    settings = settings_for(tx_bouncer.url(db_name), pooler="pgbouncer-session", max_size=8)
    failures: list[BaseException] = []
    async with Database(settings) as db:

        async def transaction(i: int) -> Any:
            return await db.run_in_transaction(lambda c: c.fetchval("SELECT $1::int", i))

        for _ in range(5):
            results = await asyncio.gather(
                *(transaction(i) for i in range(200)), return_exceptions=True
            )
            failures += [r for r in results if isinstance(r, BaseException)]
    assert failures == []


async def test_migrations_that_lose_prepared_statements_to_the_pooler_run_again(
    tx_bouncer: PgBouncer, db_name: str
) -> None:
    # `pglayer serve` migrates first, in one transaction block: told "session" in front of
    # a transaction pooler, its statements prepared in one transaction were missing in the
    # next one's server connection, and serve ended with status 1.
    settings = settings_for(tx_bouncer.url(db_name), pooler="pgbouncer-session", max_size=1)
    async with Database(settings) as db:
        await migrate(db, [], history="app")  # its statements prepared on one server connection
        other = await asyncpg.connect(tx_bouncer.url(db_name), statement_cache_size=0)
        try:
            async with other.transaction():  # holds that server connection
                await other.execute("SELECT 1")
                assert await migrate(db, [], history="app") == []  # on another one
        finally:
            await other.close()


async def test_an_apps_own_missing_or_repeated_prepared_statement_keeps_the_cache(
    server: Server, db_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    require_external(pgbouncer_binary() is not None, "pgbouncer is not installed")
    caplog.set_level(logging.WARNING, logger="pglayer")
    with PgBouncer(server.admin_url, pool_mode="session", pool_size=10) as bouncer:
        async with (
            Database(settings_for(bouncer.url(db_name), max_size=1)) as db,
            db.connection() as conn,
        ):
            await conn.execute("PREPARE twice AS SELECT 1")  # the app's own name
            for statement in ("EXECUTE nosuch", "PREPARE twice AS SELECT 1"):
                with pytest.raises(PglayerError):
                    await conn.execute(statement)
    assert not [r for r in caplog.records if "prepared statements are lost" in r.getMessage()]


async def test_opening_behind_a_session_pooler_warns_of_the_servers_own_timeouts(
    server: Server, db_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    # pglayer sends only application_name through any pooler: the server's own apply.
    require_external(pgbouncer_binary() is not None, "pgbouncer is not installed")
    caplog.set_level(logging.WARNING, logger="pglayer")
    with PgBouncer(server.admin_url, pool_mode="session", pool_size=10) as bouncer:
        async with Database(settings_for(bouncer.url(db_name))) as db:
            assert db._pool is not None
            assert db._pool.statement_timeout == 0  # the server's, not the configured 10 s
    warned = [r.getMessage() for r in caplog.records if "server's own settings" in r.getMessage()]
    assert len(warned) == 1, [r.getMessage() for r in caplog.records]
    assert "statement_timeout 0ms (configured 10s)" in warned[0]


async def test_opening_behind_a_transaction_pooler_warns_of_the_servers_own_timeouts(
    tx_bouncer: PgBouncer, db_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="pglayer")
    async with Database(settings_for(tx_bouncer.url(db_name))):
        pass
    warned = [r.getMessage() for r in caplog.records if "server's own settings" in r.getMessage()]
    assert len(warned) == 1, [r.getMessage() for r in caplog.records]
    assert "statement_timeout 0ms (configured 10s)" in warned[0]
    assert "jit on (configured off)" in warned[0]


@pytest.fixture
async def no_slots_url(
    server: Server, admin: asyncpg.Connection[Any], db_name: str
) -> AsyncIterator[str]:
    """The URL of a role the server gives no connection (`CONNECTION LIMIT 0`: 53300)."""
    require_external(pgbouncer_binary() is not None, "pgbouncer is not installed")
    role = f"limited_{uuid.uuid4().hex[:8]}"
    await admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw' CONNECTION LIMIT 0")
    try:
        host_port = urlsplit(server.admin_url).netloc.rsplit("@", 1)[-1]
        yield f"postgresql://{role}:pw@{host_port}/{db_name}"
    finally:
        await admin.execute(f"DROP ROLE {role}")


async def test_a_connection_limit_behind_the_pooler_is_said_to_be_one(
    no_slots_url: str, db_name: str
) -> None:
    # PgBouncer passes the server's 53300 on as 08P01 in words: ready said "down" ("did not
    # answer") and doctor "a role does not exist".
    with PgBouncer(no_slots_url, server_login_retry=1) as b:
        settings = settings_for(b.url(db_name), min_size=1, require_on_startup=False)
        async with Database(settings) as db:
            ready = await _ready(db)
        found = await diagnose(settings)
    assert ready.json()["pools"] == {"primary": "refused"}
    [reachable] = [f for f in found.findings if f.check == "reachable"]
    assert "refused another connection" in reachable.detail
    assert "max_connections" in reachable.detail


async def test_a_connection_limit_behind_the_pooler_stays_the_reason_while_it_holds_clients(
    no_slots_url: str, db_name: str
) -> None:
    # PgBouncer says the server's refusal once, then holds its clients until they time out:
    # ready said "down" and the startup error "did not answer in time" from then on.
    quick = {"connect_timeout": 0.5}
    # Each its own PgBouncer: the first to ask is told why.
    with PgBouncer(no_slots_url) as b, pytest.raises(PglayerError) as refused:
        await Database(settings_for(b.url(db_name), startup_timeout=3, **quick)).open()
    with PgBouncer(no_slots_url) as b:
        background = settings_for(b.url(db_name), require_on_startup=False, **quick)
        async with Database(background) as db:
            await asyncio.sleep(2)  # a refusal, then waits the pooler ends in time-outs
            ready = await _ready(db)
    assert "too many connections for role" in str(refused.value)
    assert ready.json()["pools"] == {"primary": "refused"}


def test_a_pgbouncer_interrupted_while_it_starts_is_not_left_running(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A SIGTERM to the benchmark while it started PgBouncer left it listening, with trust
    # authentication, its directory in /tmp.
    require_external(pgbouncer_binary() is not None, "pgbouncer is not installed")
    started: list[Any] = []

    def interrupted(self: PgBouncer, stderr: Any) -> None:
        started.append((self._proc, self.dir))
        raise KeyboardInterrupt

    monkeypatch.setattr(PgBouncer, "_wait_listening", interrupted)
    with pytest.raises(KeyboardInterrupt), PgBouncer(server.admin_url, pool_size=1):
        pass
    [(proc, directory)] = started
    assert proc.poll() is not None  # stopped, by its PID
    assert not directory.exists()
