"""Read replicas against a real streaming standby (`pg_basebackup -R`) of a test-owned primary."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import tempfile
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from pglayer_shop.app import create_app
from pglayer_shop.schema import apply_migrations, shop_migrations
from pglayer_shop.settings import ShopSettings

from pglayer import (
    Connection,
    ConnectionLostError,
    Database,
    PglayerError,
    TransientError,
    _replicas,
    gather,
)
from pglayer._embedded import EmbeddedPostgres
from pglayer.fastapi import ReadConnection, setup
from pglayer.fastapi.sqlalchemy import SqlSession, setup_sqlalchemy
from pglayer.migrations import MigrationError, migrate
from pglayer.sqlalchemy import create_engine
from tests.conftest import asgi_client, children_of, free_port, settings_for, wait_for
from tests.test_doctor import doctor
from tests.test_front_door import Saturated
from tests.test_metrics import scrape
from tests.test_sqlalchemy import UserRow

DB = "shop_replicated"


def _cluster(prefix: str) -> EmbeddedPostgres:
    base = Path(tempfile.mkdtemp(prefix=prefix))
    base.chmod(0o755)
    # Not fast_unsafe: a base backup needs full_page_writes; fsync off is still fine here.
    return EmbeddedPostgres(
        base, database="postgres", server_settings={"fsync": "off", "synchronous_commit": "off"}
    )


@pytest.fixture(scope="module")
def clusters() -> Iterator[tuple[EmbeddedPostgres, EmbeddedPostgres]]:
    primary = _cluster("pglayer-primary-")
    standby = _cluster("pglayer-standby-")
    try:
        primary.start()
        primary.create_database(DB)

        async def migrate() -> None:
            settings = settings_for(primary.admin_url(DB), min_size=1, max_size=1)
            async with Database(settings) as db:
                await apply_migrations(db)

        asyncio.run(migrate())
        standby.make_standby_of(primary)
        standby.start()
        yield primary, standby
    finally:
        for cluster in (standby, primary):
            cluster.destroy()
            shutil.rmtree(cluster.base_dir, ignore_errors=True)


@pytest.fixture
def primary(clusters: tuple[EmbeddedPostgres, EmbeddedPostgres]) -> EmbeddedPostgres:
    return clusters[0]


@pytest.fixture
def standby(clusters: tuple[EmbeddedPostgres, EmbeddedPostgres]) -> EmbeddedPostgres:
    return clusters[1]


def replicated_settings(
    primary: EmbeddedPostgres, standby: EmbeddedPostgres, **overrides: Any
) -> Any:
    values: dict[str, Any] = {
        "replica_urls": [standby.admin_url(DB)],
        "replica_check_interval": 0.2,
        "replica_max_lag": 0.5,
    }
    values.update(overrides)
    return settings_for(primary.admin_url(DB), **values)


@asynccontextmanager
async def replay_paused(standby: EmbeddedPostgres) -> AsyncIterator[None]:
    conn = await asyncpg.connect(standby.admin_url("postgres"))
    try:
        await conn.execute("SELECT pg_wal_replay_pause()")
        yield
    finally:
        await conn.execute("SELECT pg_wal_replay_resume()")
        await conn.close()


async def in_rotation(db: Database, timeout: float = 10) -> bool:
    """Whether replica-1 is (or comes back) in rotation within `timeout` seconds."""

    async def healthy() -> bool:
        return db.replicas is not None and db.replicas.health["replica-1"].healthy

    return bool(await wait_for(healthy, timeout=timeout))


async def in_recovery(db: Database) -> bool:
    return bool(await db.read(lambda c: c.fetchval("SELECT pg_is_in_recovery()")))


async def test_reads_go_to_the_replica_and_writes_to_the_primary(
    primary: EmbeddedPostgres, standby: EmbeddedPostgres
) -> None:
    async with Database(replicated_settings(primary, standby)) as db:

        async def streaming() -> bool:  # a standby just started has not connected yet
            return db.replicas is not None and db.replicas.health["replica-1"].healthy

        assert await wait_for(streaming, timeout=10)
        assert await in_recovery(db)
        assert not await db.run(lambda c: c.fetchval("SELECT pg_is_in_recovery()"))
        async with db.read_connection() as conn:
            assert await conn.fetchval("SELECT pg_is_in_recovery()")
        names = {p.name for p in db.pools()}
        assert names == {"primary", "replica-1"}
        assert db.replicas is not None
        assert db.replicas.health["replica-1"].reason == "ok"


async def test_gathered_reads_go_to_the_replica_when_told_they_only_read(
    primary: EmbeddedPostgres, standby: EmbeddedPostgres
) -> None:
    def recovering(c: Connection) -> Awaitable[bool]:
        return c.fetchval("SELECT pg_is_in_recovery()")

    async with Database(replicated_settings(primary, standby)) as db:
        assert await in_rotation(db)
        assert await gather(db, recovering, recovering, read=True) == (True, True)
        assert await gather(db, recovering, recovering) == (False, False)


async def test_a_probe_whose_connection_is_wedged_leaves_the_checker_running(
    primary: EmbeddedPostgres, standby: EmbeddedPostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    # asyncpg's InternalClientError (a protocol state it cannot leave, seen on a probe as
    # the standby restarted) is no InterfaceError: it ended the checker for good, and the
    # replica never came back into rotation.
    async with Database(replicated_settings(primary, standby)) as db:
        assert await in_rotation(db)
        assert db.replicas is not None
        real = db.replicas._probe
        wedged = [1]

        async def probe(replica: Database) -> Any:
            if wedged:
                wedged.pop()
                raise asyncpg.InternalClientError("cannot switch to state 12")
            return await real(replica)

        monkeypatch.setattr(db.replicas, "_probe", probe)

        async def out() -> bool:
            assert db.replicas is not None
            return not db.replicas.health["replica-1"].healthy

        assert await wait_for(out, timeout=5)
        assert await in_rotation(db)


async def test_a_lagging_replica_is_skipped_until_it_catches_up(
    primary: EmbeddedPostgres, standby: EmbeddedPostgres
) -> None:
    async with Database(replicated_settings(primary, standby)) as db:
        assert db.replicas is not None
        async with replay_paused(standby):
            for _ in range(3):
                await db.run(
                    lambda c: c.execute(
                        "INSERT INTO products (name, price, stock) VALUES ('lag', 1, 1)"
                    )
                )
                await asyncio.sleep(0.4)

            async def lagging() -> bool:
                return (
                    db.replicas is not None and db.replicas.health["replica-1"].reason == "lagging"
                )

            assert await wait_for(lagging, timeout=10)
            assert not await in_recovery(db)  # served by the primary

        assert await in_rotation(db, timeout=10)
        assert await in_recovery(db)


async def test_a_client_reads_its_own_writes_from_the_primary(
    primary: EmbeddedPostgres, standby: EmbeddedPostgres
) -> None:
    # Replay paused but within the lag bound: the replica stays in rotation without the row.
    db = Database(replicated_settings(primary, standby, replica_max_lag=600))
    app = create_app(db=db, settings=ShopSettings())
    async with app.router.lifespan_context(app), replay_paused(standby):
        async with asgi_client(app) as writer:
            created = await writer.post("/users", json={"name": "W", "email": "ryw@example.com"})
            assert created.status_code == 201
            assert "pglayer_rw=1" in created.headers["set-cookie"]
            user_id = created.json()["id"]
            assert (await writer.get(f"/users/{user_id}")).status_code == 200
        async with asgi_client(app) as stranger:  # no cookie: the (stale) replica answers
            assert (await stranger.get(f"/users/{user_id}")).status_code == 404


async def test_only_the_cookie_itself_sends_reads_to_the_primary(
    primary: EmbeddedPostgres, standby: EmbeddedPostgres
) -> None:
    db = Database(replicated_settings(primary, standby, replica_max_lag=600))
    app = create_app(db=db, settings=ShopSettings())
    async with app.router.lifespan_context(app), replay_paused(standby):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="https://shop.test") as writer:
            created = await writer.post("/users", json={"name": "C", "email": "ck@example.com"})
            assert created.status_code == 201
            assert created.headers["set-cookie"].endswith("; Secure")  # over https
            path = f"/users/{created.json()['id']}"
        async with asgi_client(app) as client:
            for cookie in ("a=pglayer_rw=1", "notpglayer_rw=1", "pglayer_rw=10"):
                # Not the cookie: read from the replica, which has not replayed the row.
                assert (await client.get(path, headers={"cookie": cookie})).status_code == 404
            assert (await client.get(path, headers={"cookie": "a=b; pglayer_rw=1"})).is_success


@pytest.mark.parametrize("strategy", ["single", "concurrent"])
async def test_the_dashboard_reads_from_the_replica_and_marks_no_write(
    primary: EmbeddedPostgres, standby: EmbeddedPostgres, strategy: str
) -> None:
    # Gathered without `read=True`, its three reads went to the primary as writes, and
    # set the cookie that sent the client's next reads there too.
    db = Database(replicated_settings(primary, standby))
    app = create_app(db=db, settings=ShopSettings(dashboard_strategy=strategy))
    async with app.router.lifespan_context(app), asgi_client(app) as client:
        assert await in_rotation(db)
        response = await client.get("/dashboard/1")
    assert response.status_code in (200, 404)
    assert "pglayer_rw" not in response.headers.get("set-cookie", "")


async def test_autocommit_writes_mark_the_client_too(
    primary: EmbeddedPostgres, standby: EmbeddedPostgres
) -> None:
    db = Database(replicated_settings(primary, standby, replica_max_lag=600))
    app = create_app(db=db, settings=ShopSettings())
    async with app.router.lifespan_context(app):
        async with asgi_client(app) as client:
            user = await client.post("/users", json={"name": "D", "email": "dep@example.com"})
            user_id = user.json()["id"]
        async with replay_paused(standby), asgi_client(app) as client:
            deposit = await client.post(f"/accounts/{user_id}/deposits", json={"amount": "5.00"})
            assert deposit.status_code == 200
            assert "pglayer_rw=1" in deposit.headers.get("set-cookie", "")
            balance = (await client.get(f"/accounts/{user_id}")).json()["balance"]
            assert balance == "5.00"  # from the primary: the replica has not replayed it
        async with replay_paused(standby), asgi_client(app) as client:
            product = {"name": "P", "price": "1.00", "stock": 1}
            created = await client.post("/products", json=product)
            assert created.status_code == 201
            assert "pglayer_rw=1" in created.headers.get("set-cookie", "")
            reread = await client.get(created.headers["location"])
            assert reread.status_code == 200


async def test_orm_writes_mark_the_client_and_orm_reads_do_not(
    primary: EmbeddedPostgres, standby: EmbeddedPostgres
) -> None:
    # A `SqlSession` write set no cookie: the client's next read, on a replica, missed it.
    db = Database(replicated_settings(primary, standby, replica_max_lag=600))
    app = FastAPI()
    setup(app, db)
    setup_sqlalchemy(app, create_engine(database=db))

    @app.post("/sa/users", status_code=201)
    async def add(session: SqlSession) -> int:
        row = UserRow(name="O", email="orm@example.com")
        session.add(row)
        await session.flush()
        return row.id

    @app.get("/sa/users/{user_id}")
    async def get(user_id: int, session: SqlSession) -> str | None:
        row = await session.get(UserRow, user_id)
        return None if row is None else row.name

    async with app.router.lifespan_context(app):
        async with asgi_client(app) as writer:
            created = await writer.post("/sa/users")
            assert created.status_code == 201
        async with asgi_client(app) as reader:
            read = await reader.get(f"/sa/users/{created.json()}")
            assert read.json() == "O"
    assert "pglayer_rw=1" in created.headers.get("set-cookie", "")
    assert "pglayer_rw" not in read.headers.get("set-cookie", "")


async def test_stopping_the_standby_under_load_gives_no_5xx_and_reads_return(
    primary: EmbeddedPostgres, standby: EmbeddedPostgres, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pglayer.replicas")
    db = Database(replicated_settings(primary, standby))
    app = create_app(db=db, settings=ShopSettings())
    statuses: Counter[int] = Counter()
    async with app.router.lifespan_context(app), asgi_client(app) as client:
        created = await client.post("/users", json={"name": "L", "email": "load@example.com"})
        user_id = created.json()["id"]

        async def caught_up() -> bool:
            return (
                await in_recovery(db)
                and await db.read(
                    lambda c: c.fetchval("SELECT count(*) FROM users WHERE id = $1", user_id)
                )
                == 1
            )

        assert await wait_for(caught_up, timeout=10)
        loop = asyncio.get_running_loop()
        stop_at = loop.time() + 2.5

        async def reader() -> None:
            n = 0
            while loop.time() < stop_at and n < 2000:
                n += 1
                statuses[(await client.get(f"/users/{user_id}")).status_code] += 1

        async def stop_standby() -> None:
            await asyncio.sleep(0.5)
            await asyncio.to_thread(standby.stop, force=True)

        await asyncio.gather(*(reader() for _ in range(8)), stop_standby())
        assert set(statuses) == {200}, statuses
        assert not await in_recovery(db)  # the primary, while the standby is down

        await asyncio.to_thread(standby.start)

        async def back() -> bool:
            return await in_recovery(db)

        assert await wait_for(back, timeout=20)
    said = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "pglayer.replicas"]
    changes = [(level, m) for level, m in said if "rotation" in m]
    assert "back in" not in changes[0][1], said  # the first check says where it stands
    stopped = [m for _, m in changes if "(unreachable)" in m or "(a read failed on it)" in m]
    assert len(stopped) == 1, said  # said once, whoever noticed first
    assert changes[-1] == ("INFO", "replica replica-1 is back in rotation (ok)"), said


def test_doctor_reports_each_replica_and_its_lag(
    primary: EmbeddedPostgres, standby: EmbeddedPostgres
) -> None:

    code, out = doctor(
        primary.admin_url(DB),
        PGLAYER_REPLICA_URLS=f"{standby.admin_url(DB)},postgresql://u:p@127.0.0.1:1/x",
    )
    assert code == 0, out
    assert "replica-1" in out
    assert "behind the primary" in out
    assert "replica-2" in out
    assert "reads use the primary" in out


async def test_metrics_show_the_replica_leave_the_rotation_while_it_lags(
    primary: EmbeddedPostgres, standby: EmbeddedPostgres
) -> None:
    db = Database(replicated_settings(primary, standby))  # max lag 0.5 s
    app = create_app(db=db, settings=ShopSettings())
    rotation = ("pglayer_replica_in_rotation", (("pool", "replica-1"),))
    lag = ("pglayer_replica_lag_seconds", (("pool", "replica-1"),))
    async with app.router.lifespan_context(app), asgi_client(app) as client:
        # A write replayed first: the standby then knows when its last replayed commit was.
        created = await client.post("/users", json={"name": "M", "email": "metrics@example.com"})
        user_id = created.json()["id"]

        async def replayed() -> bool:
            return await in_recovery(db) and bool(
                await db.read(lambda c: c.fetchval("SELECT 1 FROM users WHERE id = $1", user_id))
            )

        assert await wait_for(replayed, timeout=10)
        samples = await scrape(client)
        assert samples[rotation] == 1
        assert 0 <= samples[lag] <= 0.5
        assert not [
            k for k in samples if k[0].startswith("pglayer_replica_") and "primary" in str(k)
        ]

        async with replay_paused(standby):
            for _ in range(3):
                await db.run(
                    lambda c: c.execute(
                        "INSERT INTO products (name, price, stock) VALUES ('lag', 1, 1)"
                    )
                )
                await asyncio.sleep(0.4)

            async def out_of_rotation() -> dict[Any, float] | None:
                samples = await scrape(client)
                return samples if samples.get(rotation) == 0 else None

            samples = await wait_for(out_of_rotation, timeout=10)
            assert samples, "the replica stayed in rotation while its replay was paused"
            assert samples[lag] > 0.5

        async def back() -> bool:
            return (await scrape(client)).get(rotation) == 1

        assert await wait_for(back, timeout=10)


async def test_migrating_a_standby_is_refused_saying_so(standby: EmbeddedPostgres) -> None:
    async with Database(settings_for(standby.admin_url(DB))) as db:
        with pytest.raises(MigrationError, match="read-only standby"):
            await migrate(db, shop_migrations())


@asynccontextmanager
async def cut_off(standby: EmbeddedPostgres) -> AsyncIterator[None]:
    """The standby stops receiving from the primary (no WAL receiver): it has replayed all it
    received, so by its own account it is never behind."""
    conn = await asyncpg.connect(standby.admin_url("postgres"))
    try:
        conninfo = await conn.fetchval("SHOW primary_conninfo")
        await conn.execute("ALTER SYSTEM SET primary_conninfo = ''")
        await conn.execute("SELECT pg_reload_conf()")

        async def stopped() -> bool:
            return not await conn.fetchval("SELECT count(*) FROM pg_stat_wal_receiver")

        assert await wait_for(stopped, timeout=10)
        yield
    finally:
        await conn.execute(
            f"ALTER SYSTEM SET primary_conninfo = '{conninfo.replace(chr(39), chr(39) * 2)}'"
        )
        await conn.execute("SELECT pg_reload_conf()")
        await conn.close()


async def test_a_replica_cut_off_from_the_primary_is_lagging_though_it_replayed_all_it_got(
    primary: EmbeddedPostgres, standby: EmbeddedPostgres
) -> None:
    async with Database(replicated_settings(primary, standby)) as db:
        assert db.replicas is not None

        assert await in_rotation(db, timeout=10)
        async with cut_off(standby):
            user_id = await db.run(
                lambda c: c.fetchval(
                    "INSERT INTO users (name, email) VALUES ('cut', 'cut@example.com') RETURNING id"
                )
            )

            async def lagging() -> bool:
                return (
                    db.replicas is not None and db.replicas.health["replica-1"].reason == "lagging"
                )

            assert await wait_for(lagging, timeout=10)
            found = await db.read(
                lambda c: c.fetchval("SELECT 1 FROM users WHERE id = $1", user_id)
            )
            assert found == 1  # from the primary, not the stale replica
        assert await in_rotation(db, timeout=20)


async def test_a_standby_of_another_server_never_serves_reads(
    db_url: str, standby: EmbeddedPostgres
) -> None:
    # The test's own database has the shop's schema, as the standby has: only the server differs.
    settings = settings_for(db_url, replica_urls=[standby.admin_url(DB)], replica_max_lag=600)
    async with Database(settings) as db:
        assert db.replicas is not None
        assert db.replicas.health["replica-1"].reason == "another cluster"
        assert not await in_recovery(db)


async def test_a_read_of_what_the_replica_has_not_replayed_yet_is_answered_by_the_primary(
    primary: EmbeddedPostgres, standby: EmbeddedPostgres
) -> None:
    async with Database(replicated_settings(primary, standby, replica_max_lag=600)) as db:
        assert db.replicas is not None
        async with replay_paused(standby):
            await db.run(lambda c: c.execute("CREATE TABLE IF NOT EXISTS just_migrated (id int)"))
            try:
                assert db.replicas.health["replica-1"].healthy
                count = await db.read(lambda c: c.fetchval("SELECT count(*) FROM just_migrated"))
                assert count == 0
                assert db.replicas.health["replica-1"].healthy  # the replica is not at fault
            finally:
                await db.run(lambda c: c.execute("DROP TABLE just_migrated"))


@pytest.mark.parametrize(
    ("overrides", "max_age"),
    [
        ({"replica_max_lag": 5.0, "replica_check_interval": 1.0}, 9),  # 5 + 3 x 1, and one
        ({"replica_max_lag": 30.0, "replica_check_interval": 0.5}, 33),  # 31.5, rounded up
        ({"read_your_writes_window": 60.0}, 61),
    ],
)
async def test_the_read_your_writes_cookie_outlasts_what_a_replica_in_rotation_may_lag(
    primary: EmbeddedPostgres,
    standby: EmbeddedPostgres,
    overrides: dict[str, float],
    max_age: int,
) -> None:
    db = Database(replicated_settings(primary, standby, **overrides))
    app = create_app(db=db, settings=ShopSettings())
    async with app.router.lifespan_context(app), asgi_client(app) as client:
        product = {"name": "C", "price": "1.00", "stock": 1}
        created = await client.post("/products", json=product)
        assert created.status_code == 201
        assert f"pglayer_rw=1; Max-Age={max_age};" in created.headers["set-cookie"]


def test_a_window_shorter_than_a_replica_may_lag_is_warned_of(
    primary: EmbeddedPostgres, standby: EmbeddedPostgres, caplog: pytest.LogCaptureFixture
) -> None:
    Database(replicated_settings(primary, standby, read_your_writes_window=1.0))
    warned = [r.getMessage() for r in caplog.records if r.name == "pglayer.replicas"]
    assert any("PGLAYER_READ_YOUR_WRITES_WINDOW=1 is shorter" in m for m in warned), warned


def test_doctor_says_a_replica_cut_off_from_the_primary_is_behind(
    primary: EmbeddedPostgres, standby: EmbeddedPostgres
) -> None:
    async def cut_then_write() -> None:
        async with cut_off(standby):
            conn = await asyncpg.connect(primary.admin_url(DB))
            try:
                await conn.execute("INSERT INTO products (name, price, stock) VALUES ('d', 1, 1)")
            finally:
                await conn.close()
            code, out = await asyncio.to_thread(
                doctor,
                primary.admin_url(DB),
                PGLAYER_REPLICA_URLS=standby.admin_url(DB),
                PGLAYER_REPLICA_MAX_LAG="1",
            )
            assert code == 0, out
            assert "behind by more than 1s (has it stopped receiving" in " ".join(out.split())

    asyncio.run(cut_then_write())


def test_doctor_fails_when_a_replica_promoted_beside_its_primary_takes_writes(
    primary: EmbeddedPostgres,
) -> None:
    # After a failover with the old primary started again: a warning ("not a standby"),
    # exit 0, while new connections could write to either server.
    split = _cluster("pglayer-split-")
    try:
        split.make_standby_of(primary)
        split.start()
        split._check(split._run("pg_ctl", "promote", "-w", "-D", str(split.data_dir)), "promote")
        code, out = doctor(primary.admin_url(DB), PGLAYER_REPLICA_URLS=split.admin_url(DB))
    finally:
        split.destroy()
        shutil.rmtree(split.base_dir, ignore_errors=True)
    assert code == 1, out
    assert "takes writes, and so does the primary" in " ".join(out.split()), out


def test_doctor_says_a_standby_of_another_server_will_not_serve(
    db_url: str, standby: EmbeddedPostgres
) -> None:
    code, out = doctor(db_url, PGLAYER_REPLICA_URLS=standby.admin_url(DB))
    assert code == 0, out
    assert "is a standby of another server" in " ".join(out.split())


async def test_a_replica_that_refuses_to_open_leaves_reads_on_the_primary_and_is_tried_again(
    db_url: str, admin: asyncpg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"t_later_{uuid.uuid4().hex[:8]}"
    settings = settings_for(db_url, replica_urls=[db_url.rsplit("/", 1)[0] + f"/{name}"])
    async with Database(settings) as db:  # its database does not exist: refused, not fatal
        assert db.replicas is not None
        assert db.replicas.health["replica-1"].reason == "refused"
        assert await db.read(lambda c: c.fetchval("SELECT 1")) == 1
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            monkeypatch.setattr(_replicas, "REOPEN_EVERY", 0.0)
            db.replicas._refused["replica-1"] = 0.0  # due now
            await db.replicas.check()
            # Opened now; the test's server is no standby, so it still serves no reads.
            assert db.replicas.health["replica-1"].reason == "not a standby"
        finally:
            await db.replicas.close()
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def test_a_replica_url_the_driver_refuses_is_left_out_not_fatal(db_url: str) -> None:
    settings = settings_for(db_url, replica_urls=[f"{db_url}?target_session_attrs=bogus"])
    async with Database(settings) as db:
        assert db.replicas is not None
        assert db.replicas.health["replica-1"].reason == "refused"
        assert await db.read(lambda c: c.fetchval("SELECT 1")) == 1


async def test_while_the_primary_is_down_reads_are_served_by_the_replica_and_ready_says_so(
    standby: EmbeddedPostgres,
) -> None:
    down = f"postgresql://postgres@127.0.0.1:{free_port()}/{DB}"
    settings = settings_for(
        down, replica_urls=[standby.admin_url(DB)], replica_max_lag=600, require_on_startup=False
    )
    db = Database(settings)
    app = create_app(db=db, settings=ShopSettings())
    async with app.router.lifespan_context(app), asgi_client(app) as client:
        assert await in_recovery(db)  # the replica answers reads
        ready = await client.get("/health/ready")
        assert ready.status_code == 503
        assert ready.json()["pools"] == {"primary": "down", "replica-1": "ok"}


def _cluster_pids(cluster: EmbeddedPostgres) -> list[int]:
    postmaster = int((cluster.data_dir / "postmaster.pid").read_text().split()[0])
    return [postmaster, *children_of(postmaster)]


@contextmanager
def frozen(cluster: EmbeddedPostgres) -> Iterator[None]:
    """Every process of `cluster` stopped (SIGSTOP): it answers nothing, as behind a network
    that drops every packet."""
    pids = _cluster_pids(cluster)
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


async def test_reads_on_a_replica_that_stops_answering_move_to_the_primary_at_once(
    primary: EmbeddedPostgres, standby: EmbeddedPostgres
) -> None:
    settings = replicated_settings(
        primary, standby, replica_max_lag=600, query_timeout=20.0, acquire_timeout=20.0
    )
    async with Database(settings) as db:
        assert db.replicas is not None

        assert await in_rotation(db, timeout=10)
        loop = asyncio.get_running_loop()
        slowest = 0.0

        async def reader() -> None:
            nonlocal slowest
            for _ in range(30):
                started = loop.time()
                assert await db.read(lambda c: c.fetchval("SELECT 1 FROM pg_sleep(0.02)")) == 1
                slowest = max(slowest, loop.time() - started)

        with frozen(standby):
            # 16 readers on the replica's 10 connections: some run, some wait for one.
            await asyncio.gather(*(reader() for _ in range(16)))
            assert db.replicas.health["replica-1"].reason == "unreachable"
        # Neither the query deadline nor the acquire deadline (20 s) was waited out.
        assert slowest < 10, slowest
        assert await in_rotation(db, timeout=20)


async def test_reads_connecting_to_a_replica_that_stops_answering_move_to_the_primary(
    primary: EmbeddedPostgres, standby: EmbeddedPostgres
) -> None:
    # Its pool has one connection open: the other readers each connect, and those connects
    # hang; they are given up with the replica, not waited out (8 s here: the connect and
    # acquire deadlines).
    settings = replicated_settings(
        primary,
        standby,
        replica_max_lag=600,
        min_size=1,
        max_size=8,
        connect_timeout=8.0,
        acquire_timeout=8.0,
    )
    async with Database(settings) as db:
        assert await in_rotation(db, timeout=10)
        loop = asyncio.get_running_loop()

        async def read() -> float:
            started = loop.time()
            assert await db.read(lambda c: c.fetchval("SELECT 1 FROM pg_sleep(0.5)")) == 1
            return loop.time() - started

        with frozen(standby):
            took = await asyncio.gather(*(read() for _ in range(6)))
        assert max(took) < 5, took
        assert await in_rotation(db, timeout=20)


async def test_a_standby_restarted_while_the_primary_is_idle_is_back_in_rotation(
    primary: EmbeddedPostgres, standby: EmbeddedPostgres
) -> None:
    async with Database(replicated_settings(primary, standby)) as db:
        assert db.replicas is not None

        assert await in_rotation(db, timeout=10)
        # After a restart the standby's received position starts behind its replayed one,
        # and no transaction has been replayed since: by its own account, behind by an
        # unknown amount. It has all the primary has, and nothing is written meanwhile.
        await asyncio.to_thread(standby.restart)
        await asyncio.sleep(1.0)  # a few checks: the restart is seen
        assert await in_rotation(db, timeout=10), db.replicas.health


async def test_lists_are_served_by_a_replica_while_the_primary_is_down(
    primary: EmbeddedPostgres, standby: EmbeddedPostgres
) -> None:
    up = Database(replicated_settings(primary, standby, replica_max_lag=600))
    app = create_app(db=up, settings=ShopSettings())
    async with app.router.lifespan_context(app), asgi_client(app) as client:
        assert (await client.get("/users?limit=2")).status_code == 200  # the secret is made

        async def replayed() -> bool:
            secret = "SELECT count(*) FROM pglayer_secrets"
            return bool(await up.read(lambda c: c.fetchval(secret))) and await in_recovery(up)

        assert await wait_for(replayed, timeout=10)
    down = f"postgresql://postgres@127.0.0.1:{free_port()}/{DB}"
    settings = settings_for(
        down, replica_urls=[standby.admin_url(DB)], replica_max_lag=600, require_on_startup=False
    )
    app = create_app(db=Database(settings), settings=ShopSettings())
    async with app.router.lifespan_context(app), asgi_client(app) as client:
        page = await client.get("/users?limit=2")
        assert page.status_code == 200, page.text


@pytest.fixture(scope="module")
def other_standby() -> Iterator[EmbeddedPostgres]:
    """A standby of another primary: the same database name, another server's data."""
    other, standby = _cluster("pglayer-other-"), _cluster("pglayer-other-standby-")
    try:
        other.start()
        other.create_database(DB)
        standby.make_standby_of(other)
        standby.start()
        yield standby
    finally:
        for cluster in (standby, other):
            cluster.destroy()
            shutil.rmtree(cluster.base_dir, ignore_errors=True)


async def test_standbys_of_different_servers_serve_nothing_while_the_primary_is_unknown(
    standby: EmbeddedPostgres, other_standby: EmbeddedPostgres
) -> None:
    down = f"postgresql://postgres@127.0.0.1:{free_port()}/{DB}"
    urls = [standby.admin_url(DB), other_standby.admin_url(DB)]
    settings = settings_for(down, replica_urls=urls, replica_max_lag=600, require_on_startup=False)
    async with Database(settings) as db:
        assert db.replicas is not None
        reasons = {name: h.reason for name, h in db.replicas.health.items()}
        assert reasons == {"replica-1": "another cluster", "replica-2": "another cluster"}


@pytest.mark.parametrize("via", ["read", "read_connection"])
async def test_a_replica_whose_connections_are_all_busy_stays_in_rotation(
    primary: EmbeddedPostgres, standby: EmbeddedPostgres, via: str
) -> None:
    settings = replicated_settings(
        primary, standby, replica_max_lag=600, min_size=1, max_size=2, acquire_timeout=0.3
    )
    async with Database(settings) as db:
        assert db.replicas is not None

        assert await in_rotation(db, timeout=10)
        slow = [asyncio.create_task(db.read(lambda c: c.fetchval("SELECT pg_sleep(1.5)")))
                for _ in range(2)]  # fmt: skip
        await asyncio.sleep(0.2)  # both of its connections taken
        if via == "read":
            assert not await in_recovery(db)  # no connection in time: the primary answered
        else:
            async with db.read_connection() as conn:
                assert not await conn.fetchval("SELECT pg_is_in_recovery()")
        assert db.replicas.health["replica-1"].healthy  # busy is not broken
        await asyncio.gather(*slow)


async def test_a_read_that_fails_on_one_replica_is_given_to_another_before_the_primary(
    primary: EmbeddedPostgres, standby: EmbeddedPostgres
) -> None:
    two = [standby.admin_url(DB), standby.admin_url(DB)]  # two replicas (one server, here)
    async with Database(replicated_settings(primary, standby, replica_urls=two)) as db:
        assert db.replicas is not None
        assert await in_rotation(db)
        attempts = 0

        async def read(conn: Any) -> bool:
            nonlocal attempts
            attempts += 1
            if attempts == 1:
                raise ConnectionLostError  # as when the replica's connection drops mid-read
            return bool(await conn.fetchval("SELECT pg_is_in_recovery()"))

        assert await db.read(read)  # answered by the other replica, not the primary
        assert attempts == 2
        assert sorted(h.healthy for h in db.replicas.health.values()) == [False, True]


async def _write_on(primary: EmbeddedPostgres) -> None:
    conn = await asyncpg.connect(primary.admin_url(DB))
    try:
        await conn.execute("INSERT INTO products (name, price, stock) VALUES ('lag', 1, 1)")
    finally:
        await conn.close()


async def test_a_replica_paused_before_the_app_starts_is_lagging_from_its_first_check(
    primary: EmbeddedPostgres, standby: EmbeddedPostgres
) -> None:
    # Just after start the primary's positions go back no time at all: without the
    # replica's own account it looked current for PGLAYER_REPLICA_MAX_LAG seconds.
    async with replay_paused(standby):
        await _write_on(primary)
        await asyncio.sleep(1.5)  # three times the bound
        async with Database(replicated_settings(primary, standby)) as db:
            assert db.replicas is not None
            assert db.replicas.health["replica-1"].reason == "lagging"
            assert not await in_recovery(db)


async def test_the_lag_reported_keeps_growing_past_the_positions_kept(
    primary: EmbeddedPostgres, standby: EmbeddedPostgres
) -> None:
    # Positions are kept for the bound plus three intervals (1.1 s here): the lag reported
    # stopped there, so an alert on a long lag could never fire.
    async with Database(replicated_settings(primary, standby)) as db:
        assert db.replicas is not None
        assert await in_rotation(db)
        async with replay_paused(standby):
            await _write_on(primary)

            async def long_behind() -> bool:
                assert db.replicas is not None
                lag = db.replicas.health["replica-1"].lag_seconds
                return lag is not None and lag > 3.0

            assert await wait_for(long_behind, timeout=10)


async def test_a_read_connection_on_what_the_replica_has_not_replayed_is_a_503_not_a_500(
    primary: EmbeddedPostgres, standby: EmbeddedPostgres
) -> None:
    db = Database(replicated_settings(primary, standby, replica_max_lag=600))
    app = FastAPI()
    setup(app, db)

    @app.get("/migrated")
    async def migrated(conn: ReadConnection) -> int:
        return int(await conn.fetchval("SELECT count(*) FROM just_migrated_too"))

    @app.get("/typo")
    async def typo(conn: ReadConnection) -> int:
        return int(await conn.fetchval("SELECT count(*) FROM no_such_table_anywhere"))

    async with app.router.lifespan_context(app), asgi_client(app) as client:
        assert db.replicas is not None
        assert await in_rotation(db)
        # A replica in step: a bug (500), and the replica is not at fault.
        assert (await client.get("/typo")).status_code == 500
        assert db.replicas.health["replica-1"].healthy
        async with replay_paused(standby):
            await db.run(lambda c: c.execute("CREATE TABLE just_migrated_too (id int)"))
            replica = db.replicas.replicas[0]

            async def seen_behind() -> bool:
                return db.replicas is not None and db.replicas.behind(replica)

            try:
                assert await wait_for(seen_behind)  # in rotation still (its bound: 600 s)
                first = await client.get("/migrated")
                assert first.status_code == 503, first.text
                assert first.json()["code"] == "unavailable"
                assert "retry-after" in first.headers
                assert db.replicas.health["replica-1"].reason == "lagging"
                assert (await client.get("/migrated")).json() == 0  # the primary answers
            finally:
                await db.run(lambda c: c.execute("DROP TABLE just_migrated_too"))


async def test_a_write_through_a_read_on_a_replica_is_the_callers_error_not_an_outage(
    primary: EmbeddedPostgres, standby: EmbeddedPostgres
) -> None:
    # The standby refuses it as read-only (25006): the handler's bug, not a read-only primary
    # (which would take the replica out of rotation and run the write on the primary).
    async with Database(replicated_settings(primary, standby)) as db:
        assert db.replicas is not None
        assert await in_rotation(db)
        with pytest.raises(PglayerError) as raised:
            await db.read(lambda c: c.execute("CREATE TABLE written_through_a_read (id int)"))
        assert not isinstance(raised.value, TransientError)
        assert db.replicas.health["replica-1"].healthy


async def test_reads_for_a_healthy_replica_pass_the_door_while_the_primary_is_saturated(
    primary: EmbeddedPostgres, standby: EmbeddedPostgres
) -> None:
    # The door looked at the primary's pool alone: reads a replica would serve got 503
    # `overloaded` whenever the primary (or its PgBouncer) was in trouble.
    settings = replicated_settings(
        primary, standby, replica_max_lag=600, max_size=1, acquire_timeout=0.5, refusal_delay=0
    )
    db = Database(settings)
    app = create_app(db=db, settings=ShopSettings())
    async with app.router.lifespan_context(app), asgi_client(app) as client:
        assert await in_rotation(db)
        async with Saturated(db):
            assert (await client.get("/products/1")).status_code in (200, 404)
            assert db.replicas is not None
            db.replicas.mark_failed(db.replicas.replicas[0])
            assert db.saturated() is not None  # no replica to take it: refused at the door
