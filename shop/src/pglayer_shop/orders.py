"""Placing an order: stock, balance and the order row change together or not at all."""

from __future__ import annotations

import hashlib
import logging
from typing import Any

from pglayer import Connection, IdempotencyKeys
from pglayer.fastapi import Problem
from pglayer_shop.models import OrderCreate

__all__ = ["ORDER_COLUMNS", "place_order", "request_hash"]

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


async def _place(conn: Connection, body: OrderCreate) -> dict[str, Any]:
    row = await conn.fetchrow(_PLACE, body.user_id, body.product_id, body.quantity)
    assert row is not None
    if row["id"] is None:
        raise await _explain_failure(conn, body, row["stock_ok"])
    return {name: row[name] for name in _ORDER_FIELDS}


async def place_order(
    conn: Connection, body: OrderCreate, key: str | None, keys: IdempotencyKeys
) -> tuple[dict[str, Any], bool]:
    """Place the order inside the caller's transaction; return it and whether it is a replay.

    With a key, `pglayer.IdempotencyKeys` claims it first in this transaction: a concurrent
    request with the same key waits on it, then replays the stored order; a rollback takes
    the key with it.
    """
    return await keys.run(conn, "orders", key, request_hash(body), lambda c: _place(c, body))
