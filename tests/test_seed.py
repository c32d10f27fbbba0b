"""Seeding: every row lands, accounts are funded, and ids continue after it."""

from __future__ import annotations

import asyncio

import httpx
from pglayer_shop.seed import SeedCounts, is_empty, seed

from pglayer import Database
from tests.conftest import settings_for


async def test_seed_loads_consistent_rows_and_the_api_keeps_working(
    db: Database, client: httpx.AsyncClient
) -> None:
    assert await is_empty(db)
    written: dict[str, int] = {}

    def progress(table: str, rows: int) -> None:
        written[table] = written.get(table, 0) + rows

    await seed(db, SeedCounts(users=300, products=20, orders=1_000), progress=progress)
    assert written == {"users": 300, "products": 20, "orders": 1_000}
    async with db.connection() as conn:
        row = await conn.fetchrow(
            """
            SELECT (SELECT count(*) FROM users) AS users,
                   (SELECT count(*) FROM accounts WHERE balance = 1000) AS funded,
                   (SELECT count(*) FROM orders o JOIN products p ON p.id = o.product_id
                     WHERE o.total = o.unit_price * o.quantity AND o.unit_price = p.price
                       AND o.created_at > now() - interval '61 days') AS orders
            """
        )
    assert row is not None
    assert dict(row) == {"users": 300, "funded": 300, "orders": 1_000}
    assert not await is_empty(db)
    # Ids were copied explicitly; a new user must still get a fresh one.
    response = await client.post("/users", json={"name": "New", "email": "new@example.com"})
    assert response.status_code == 201
    assert response.json()["id"] == 301


async def test_seeding_twice_appends(db: Database) -> None:
    await seed(db, SeedCounts(users=10, products=2, orders=5))
    await seed(db, SeedCounts(users=10, products=2, orders=5))
    async with db.connection() as conn:
        assert await conn.fetchval("SELECT count(DISTINCT email) FROM users") == 20


async def test_seeded_data_keeps_the_contracts_invariants(db: Database) -> None:
    await seed(db, SeedCounts(users=40, products=5, orders=300))
    await seed(db, SeedCounts(users=10, products=2, orders=50))  # a second seed too
    async with db.connection() as conn:
        row = await conn.fetchrow(
            """
            SELECT (SELECT sum(amount) FROM deposits) - (SELECT sum(total) FROM orders)
                       = (SELECT sum(balance) FROM accounts) AS money_kept,
                   (SELECT bool_and(p.stock + coalesce(o.quantity, 0) = 1000000)
                      FROM products AS p
                      LEFT JOIN (SELECT product_id, sum(quantity) AS quantity FROM orders
                                  GROUP BY product_id) AS o ON o.product_id = p.id)
                       AS stock_kept,
                   (SELECT min(balance) FROM accounts) AS least_balance
            """
        )
    assert row is not None
    assert (row["money_kept"], row["stock_kept"], row["least_balance"]) == (True, True, 1000)


async def test_two_seeds_at_once_both_land(db_url: str) -> None:
    async with Database(settings_for(db_url, min_size=1, max_size=4)) as db:
        counts = SeedCounts(users=200, products=5, orders=500)
        await asyncio.gather(seed(db, counts), seed(db, counts))
        async with db.connection() as conn:
            assert await conn.fetchval("SELECT count(DISTINCT email) FROM users") == 400


async def test_two_servers_seeding_an_empty_database_at_once_seed_it_once(db_url: str) -> None:
    async with Database(settings_for(db_url, min_size=1, max_size=4)) as db:
        counts = SeedCounts(users=200, products=5, orders=500)
        done = await asyncio.gather(*(seed(db, counts, only_if_empty=True) for _ in range(2)))
        assert sorted(done) == [False, True]
        async with db.connection() as conn:
            assert await conn.fetchval("SELECT count(*) FROM users") == 200
