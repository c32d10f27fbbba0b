"""Placing an order: stock, balance and the order row change together or not at all."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Any

from pglayer import Connection, Database, PglayerError, Record
from pglayer.fastapi import Problem
from pglayer_shop.models import OrderCreate

__all__ = [
    "ORDER_COLUMNS",
    "expire_idempotency_keys",
    "place_order",
    "request_hash",
    "sweep_forever",
]

log = logging.getLogger("pglayer_shop")

_ORDER_FIELDS = ("id", "user_id", "product_id", "quantity", "unit_price", "total", "created_at")
ORDER_COLUMNS = ", ".join(_ORDER_FIELDS)

# One round trip. Each decrement is conditional, so concurrent orders can never oversell or
# overdraw: under READ COMMITTED a blocked UPDATE re-checks its WHERE on the newest row.
# Locks are always taken product first, then account, so orders cannot deadlock each other.
_PLACE = f"""
WITH p AS (
    UPDATE products SET stock = stock - $3
    WHERE id = $2 AND stock >= $3
    RETURNING price
), a AS (
    UPDATE accounts SET balance = balance - p.price * $3, updated_at = now()
    FROM p
    WHERE accounts.user_id = $1 AND accounts.balance >= p.price * $3
    RETURNING accounts.user_id
), o AS (
    INSERT INTO orders (user_id, product_id, quantity, unit_price, total)
    SELECT $1, $2, $3, p.price, p.price * $3 FROM p, a
    RETURNING {ORDER_COLUMNS}
)
SELECT EXISTS (SELECT 1 FROM p) AS stock_ok, o.*
FROM (SELECT 1) AS one LEFT JOIN o ON true
"""


def request_hash(body: OrderCreate) -> str:
    """What an idempotency key is bound to: the request body."""
    return hashlib.sha256(body.model_dump_json().encode()).hexdigest()


async def _explain_failure(conn: Connection, body: OrderCreate, stock_ok: bool) -> Problem:
    row = await conn.fetchrow(
        """
        SELECT EXISTS (SELECT 1 FROM accounts WHERE user_id = $1) AS user_exists,
               EXISTS (SELECT 1 FROM products WHERE id = $2) AS product_exists
        """,
        body.user_id,
        body.product_id,
    )
    assert row is not None
    if not row["user_exists"]:
        return Problem(404, "not_found", f"User {body.user_id} does not exist.")
    if not row["product_exists"]:
        return Problem(404, "not_found", f"Product {body.product_id} does not exist.")
    if not stock_ok:
        return Problem(409, "insufficient_stock", "Not enough stock for this quantity.")
    return Problem(409, "insufficient_funds", "The balance does not cover this order.")


async def _replay(conn: Connection, key: str, digest: str) -> Record:
    stored = await conn.fetchrow(
        "SELECT request_hash, order_id FROM idempotency_keys WHERE key = $1", key
    )
    assert stored is not None
    assert stored["order_id"] is not None
    if stored["request_hash"] != digest:
        raise Problem(
            422,
            "idempotency_key_reused",
            "This Idempotency-Key was used with a different request body.",
        )
    order = await conn.fetchrow(
        f"SELECT {ORDER_COLUMNS} FROM orders WHERE id = $1", stored["order_id"]
    )
    assert order is not None
    return order


async def place_order(
    conn: Connection, body: OrderCreate, key: str | None, key_ttl: float
) -> tuple[Record | dict[str, Any], bool]:
    """Place the order inside the caller's transaction; return it and whether it is a replay.

    A key is inserted first: a concurrent request with the same key waits on that row until
    this transaction ends, then finds it and replays the stored order. If this transaction
    rolls back, so does the key, and the request can be sent again. A key older than
    `key_ttl` seconds counts as gone (the sweep deletes it later): it is taken over.
    """
    digest = request_hash(body)
    if key is not None:
        fresh = await conn.fetchval(
            """
            INSERT INTO idempotency_keys (key, request_hash) VALUES ($1, $2)
            ON CONFLICT (key) DO UPDATE
                SET request_hash = EXCLUDED.request_hash, order_id = NULL, created_at = now()
                WHERE idempotency_keys.created_at < now() - make_interval(secs => $3)
            RETURNING true
            """,
            key,
            digest,
            key_ttl,
        )
        if not fresh:
            return await _replay(conn, key, digest), True
    row = await conn.fetchrow(_PLACE, body.user_id, body.product_id, body.quantity)
    assert row is not None
    if row["id"] is None:
        raise await _explain_failure(conn, body, row["stock_ok"])
    order = {name: row[name] for name in _ORDER_FIELDS}
    if key is not None:
        await conn.execute(
            "UPDATE idempotency_keys SET order_id = $2 WHERE key = $1", key, order["id"]
        )
    return order, False


_SWEEP = """
WITH doomed AS (
    SELECT key FROM idempotency_keys
    WHERE created_at < now() - make_interval(secs => $1)
    ORDER BY created_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM idempotency_keys AS k USING doomed WHERE k.key = doomed.key RETURNING 1
)
SELECT count(*) FROM gone
"""


async def expire_idempotency_keys(db: Database, ttl: float, *, batch: int = 500) -> int:
    """Delete keys older than `ttl` seconds, `batch` at a time, each batch its own short
    transaction that skips keys in use (so no request waits on the sweep); return how many."""
    deleted = 0
    while True:
        count: int = await db.run(lambda conn: conn.fetchval(_SWEEP, ttl, batch), retry=False)
        deleted += count
        if count < batch:
            return deleted
        await asyncio.sleep(0)  # let requests in between batches


async def sweep_forever(db: Database, ttl: float, interval: float) -> None:
    """`expire_idempotency_keys` every `interval` seconds until cancelled."""
    while True:
        await asyncio.sleep(interval)
        try:
            deleted = await expire_idempotency_keys(db, ttl)
        except PglayerError as exc:
            log.warning("idempotency key sweep failed (%s); next in %gs", type(exc).__name__,
                        interval)  # fmt: skip
            continue
        if deleted:
            log.info("deleted %d expired idempotency keys", deleted)
