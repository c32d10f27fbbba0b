"""Demo data, bulk-loaded with COPY in one transaction."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from pglayer import Connection, Database

__all__ = ["SeedCounts", "is_empty", "seed"]

CHUNK = 20_000
Progress = Callable[[str, int], None]  # (table, rows just written)


# Demo data, in one transaction: bounds that keep a typo from filling the disk.
MAX_USERS = 10_000_000
MAX_PRODUCTS = 1_000_000
MAX_ORDERS = 50_000_000


class SeedCounts:
    def __init__(self, users: int = 1_000, products: int = 100, orders: int = 5_000) -> None:
        if min(users, products, orders) < 0:
            raise ValueError("counts must not be negative")
        for name, count, most in (
            ("users", users, MAX_USERS), ("products", products, MAX_PRODUCTS),
            ("orders", orders, MAX_ORDERS),
        ):  # fmt: skip
            if count > most:
                raise ValueError(f"at most {most:,} {name} (in one transaction, held till the end)")
        if orders and not (users and products):
            raise ValueError("orders need users and products")
        self.users, self.products, self.orders = users, products, orders


async def is_empty(db: Database) -> bool:
    """True when the shop has no users yet."""
    async with db.connection() as conn:
        return not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM users)")


def _chunks(rows: Iterator[tuple[Any, ...]], size: int) -> Iterator[list[tuple[Any, ...]]]:
    chunk: list[tuple[Any, ...]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


async def _next_id(conn: Connection, table: str) -> int:
    return int(await conn.fetchval(f"SELECT coalesce(max(id), 0) + 1 FROM {table}"))


async def _copy(
    conn: Connection,
    table: str,
    columns: list[str],
    rows: Iterator[tuple[Any, ...]],
    progress: Progress,
) -> None:
    progress(table, 0)  # named as it starts, not after its first chunk
    for chunk in _chunks(rows, CHUNK):
        await conn.copy_records(table, chunk, columns=columns, timeout=600)
        progress(table, len(chunk))
    # Ids were given explicitly; move the identity past them.
    await conn.execute(
        f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
        f"(SELECT coalesce(max(id), 1) FROM {table}))"
    )


# The seeded orders as if placed through the API, so that the contract's invariants hold
# from the start: each product's stock fell by its orders' quantities, and each account
# holds a deposit of 1000.00 plus its orders' totals (its balance, 1000.00, is the deposit
# less the orders).
_AS_IF_PLACED = """
WITH sold AS (
    UPDATE products AS p SET stock = p.stock - o.quantity
      FROM (SELECT product_id, sum(quantity) AS quantity FROM orders
             WHERE id >= $3 GROUP BY product_id) AS o
     WHERE p.id = o.product_id AND p.id >= $2
)
INSERT INTO deposits (user_id, amount, created_at)
SELECT u.id, 1000.00 + coalesce(o.total, 0), u.created_at
  FROM users AS u
  LEFT JOIN (SELECT user_id, sum(total) AS total FROM orders WHERE id >= $3 GROUP BY user_id) AS o
    ON o.user_id = u.id
 WHERE u.id >= $1
"""


async def seed(
    db: Database,
    counts: SeedCounts,
    *,
    progress: Progress | None = None,
    rng_seed: int = 42,
    only_if_empty: bool = False,
) -> bool:
    """Add `counts` users (with funded accounts), products and orders of the last 60 days,
    consistent as if the orders had been placed through the API; False if `only_if_empty`
    and the shop has users (another process seeded it first)."""
    report = progress or (lambda _table, _n: None)
    rng = random.Random(rng_seed)
    now = datetime.now(UTC)
    async with db.transaction(timeout=30) as conn:
        # One seed at a time (two servers starting on an empty database, two seed commands):
        # each numbers its rows from the largest id, which the other would take too.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('pglayer_shop.seed'))")
        if only_if_empty and await conn.fetchval("SELECT EXISTS (SELECT 1 FROM users)"):
            return False
        await conn.execute("SET LOCAL statement_timeout = 0")
        first_user = await _next_id(conn, "users")
        first_product = await _next_id(conn, "products")
        first_order = await _next_id(conn, "orders")
        user_ids = range(first_user, first_user + counts.users)
        await _copy(
            conn,
            "users",
            ["id", "name", "email", "created_at"],
            (
                (i, f"User {i}", f"user{i}@example.com", now - timedelta(days=90, seconds=i))
                for i in user_ids
            ),
            report,
        )
        await conn.execute(
            "INSERT INTO accounts (user_id, balance) SELECT id, 1000.00 FROM users WHERE id >= $1",
            first_user,
        )
        prices = [Decimal(rng.randint(100, 10_000)) / 100 for _ in range(counts.products)]
        await _copy(
            conn,
            "products",
            ["id", "name", "price", "stock"],
            (
                (first_product + n, f"Product {first_product + n}", price, 1_000_000)
                for n, price in enumerate(prices)
            ),
            report,
        )

        def orders() -> Iterator[tuple[Any, ...]]:
            span = 60 * 24 * 3600
            for n in range(counts.orders):
                product = rng.randrange(counts.products)
                quantity = rng.randint(1, 5)
                price = prices[product]
                yield (
                    first_order + n,
                    first_user + rng.randrange(counts.users),
                    first_product + product,
                    quantity,
                    price,
                    price * quantity,
                    now - timedelta(seconds=rng.randrange(span)),
                )

        await _copy(
            conn,
            "orders",
            ["id", "user_id", "product_id", "quantity", "unit_price", "total", "created_at"],
            orders(),
            report,
        )
        await conn.execute(_AS_IF_PLACED, first_user, first_product, first_order)
    async with db.connection() as conn:
        await conn.execute("ANALYZE users, accounts, products, orders", timeout=600)
    return True
