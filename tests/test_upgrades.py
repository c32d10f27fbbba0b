"""The shop's schema upgraded in place from its released versions, with data in it."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from pglayer_shop.schema import apply_migrations, pending, shop_migrations

from pglayer import Database
from pglayer.migrations import Migration, install_pglayer_tables, migrate
from tests.conftest import Server, empty_database, free_port, settings_for
from tests.test_cli import clean_env, run_cli

RELEASED = Path(__file__).parent / "data" / "released_migrations"
FUNCTIONS = """
SELECT p.oid::regprocedure::text, pg_get_functiondef(p.oid)
  FROM pg_proc AS p JOIN pg_namespace AS n ON n.oid = p.pronamespace
 WHERE n.nspname = 'public' ORDER BY 1
"""


@pytest.fixture
async def new_db(empty_db_url: str) -> AsyncIterator[Database]:
    async with Database(settings_for(empty_db_url)) as db:
        yield db


def released(upto: str, texts: dict[str, str]) -> list[Migration]:
    """The shop's files up to version `upto`, with some as an earlier release had them
    (`NAME.COMMIT.sql` in `RELEASED`: its name then, its text)."""
    return [
        as_released(m, texts[m.version]) if m.version in texts else m
        for m in shop_migrations()
        if m.version <= upto
    ]


def as_released(m: Migration, file: str) -> Migration:
    name = file.split(".")[0] + ".sql"
    return dataclasses.replace(m, name=name, sql=(RELEASED / file).read_text())


async def functions(db: Database) -> list[tuple[str, str]]:
    async with db.connection() as conn:
        return [(r[0], r[1]) for r in await conn.fetch(FUNCTIONS)]


@pytest.mark.parametrize(
    ("upto", "texts"),
    [
        ("0006", {"0006": "0006_place_order_function.e6e97cc.sql"}),
        ("0007", {"0007": "0007_place_orders_together.6b50416.sql"}),
        ("0007", {"0007": "0007_place_orders_together.0823d86.sql"}),
        (
            "0007",
            {
                "0006": "0006_place_order_function.e6e97cc.sql",
                "0007": "0007_place_order_total_bound.3c9e164.sql",
            },
        ),
    ],
)
async def test_a_database_of_an_earlier_release_is_brought_to_todays_functions(
    new_db: Database,
    server: Server,
    admin: asyncpg.Connection[Any],
    upto: str,
    texts: dict[str, str],
) -> None:
    await install_pglayer_tables(new_db)
    await migrate(new_db, released(upto, texts))
    assert await pending(new_db)  # this release's code would refuse to serve it
    await apply_migrations(new_db)
    assert await pending(new_db) == []
    async with (
        empty_database(server, admin) as fresh,
        Database(settings_for(fresh)) as db,
    ):
        await apply_migrations(db)
        assert await functions(new_db) == await functions(db)


async def test_a_key_an_older_shop_commits_while_0005_runs_is_moved_not_lost(
    new_db: Database,
) -> None:
    await install_pglayer_tables(new_db)
    await migrate(new_db, released("0004", {}))
    async with new_db.connection() as conn:
        user = await conn.fetchval(
            "INSERT INTO users (email, name) VALUES ('a@example.com', 'A') RETURNING id"
        )
        product = await conn.fetchval(
            "INSERT INTO products (name, price, stock) VALUES ('P', 12.5, 5) RETURNING id"
        )
    async with new_db.connection() as old_shop:
        # An order of the older shop, its key written and not yet committed.
        tx = old_shop.raw.transaction()
        await tx.start()
        order = await old_shop.fetchval(
            "INSERT INTO orders (user_id, product_id, quantity, unit_price, total)"
            " VALUES ($1, $2, 1, 12.5, 12.5) RETURNING id",
            user,
            product,
        )
        await old_shop.execute(
            "INSERT INTO idempotency_keys (key, request_hash, order_id) VALUES ('k1', 'h', $1)",
            order,
        )
        upgrade = asyncio.create_task(apply_migrations(new_db))
        await asyncio.sleep(0.5)  # the upgrade waits for it, or has copied the table without it
        await tx.commit()
    await upgrade
    async with new_db.connection() as conn:
        moved = await conn.fetchval(
            "SELECT response::jsonb ->> 'id' FROM pglayer_idempotency_keys"
            " WHERE scope = 'orders' AND key = 'k1'"
        )
    assert moved == str(order)


async def test_replies_stored_in_jsonbs_key_order_are_rewritten_as_the_api_sends_them(
    new_db: Database,
) -> None:
    await install_pglayer_tables(new_db)
    await migrate(new_db, released("0009", {}))
    as_jsonb = (
        '{"id": 7, "total": "37.50", "user_id": 3, "quantity": 3, "created_at":'
        ' "2026-11-26T03:20:04.123456Z", "product_id": 21, "unit_price": "12.50"}'
    )
    other = '{"total": "1.00", "id": 8}'
    async with new_db.connection() as conn:
        await conn.execute(
            "INSERT INTO pglayer_idempotency_keys (scope, key, request_hash, response)"
            " VALUES ('orders', 'a', 'h', $1::text::json), ('orders', 'b', 'h', $2::text::json)",
            as_jsonb,
            other,
        )
    await apply_migrations(new_db)
    async with new_db.connection() as conn:
        found = await conn.fetch("SELECT key, response::text FROM pglayer_idempotency_keys")
    rows = {r["key"]: r["response"] for r in found}
    assert rows["a"] == (
        '{"id":7,"user_id":3,"product_id":21,"quantity":3,"unit_price":"12.50",'
        '"total":"37.50","created_at":"2026-11-26T03:20:04.123456Z"}'
    )
    assert rows["b"] == other


async def test_serve_refusing_a_changed_file_applies_nothing_not_even_pglayers_own(
    new_db: Database,
) -> None:
    # pglayer's tables were committed first, then the refusal said "nothing was applied".
    await migrate(new_db, released("0004", {}))
    async with new_db.connection() as conn:
        await conn.execute(
            "UPDATE pglayer_migrations SET checksum = repeat('0', 64) WHERE version = '0004'"
        )
    url = new_db.settings.url
    assert url is not None
    env = clean_env(DATABASE_URL=url.get_secret_value())
    served = await asyncio.to_thread(
        run_cli, "serve", "--no-seed", "--port", str(free_port()), env=env
    )
    assert served.returncode == 1, served.stderr
    assert "changed after it was applied" in " ".join(served.stderr.split())
    async with new_db.connection() as conn:
        assert await conn.fetchval("SELECT to_regclass('pglayer_idempotency_keys')") is None
