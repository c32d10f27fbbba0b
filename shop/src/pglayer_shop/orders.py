"""Placing an order: stock, balance and the order row change together or not at all."""

from __future__ import annotations

import hashlib
import logging
from typing import Any

from pglayer import Connection, Database, IdempotencyKeys
from pglayer.fastapi import Problem
from pglayer_shop.models import OrderCreate

__all__ = ["ORDER_COLUMNS", "place_order", "request_hash"]

log = logging.getLogger("pglayer_shop")

_ORDER_FIELDS = ("id", "user_id", "product_id", "quantity", "unit_price", "total", "created_at")
ORDER_COLUMNS = ", ".join(_ORDER_FIELDS)

# Migration 0006: lock, check, then change, in one call. Without a key it is its own
# implicit transaction, so the product's row lock is never held across a round trip to
# the app; with one, it runs inside the key's transaction.
_PLACE = "SELECT * FROM shop_place_order($1, $2, $3, $4)"


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
    # `lock_timeout_ms`: the bound left, set by `db.run`; None in a transaction (SET LOCAL).
    row = await conn.fetchrow(
        _PLACE, body.user_id, body.product_id, body.quantity, conn.lock_timeout_ms
    )
    assert row is not None
    if row["id"] is None:
        raise await _explain_failure(conn, body, row["stock_ok"])
    return {name: row[name] for name in _ORDER_FIELDS}


async def place_order(
    db: Database, body: OrderCreate, key: str | None, keys: IdempotencyKeys, lock_timeout: float
) -> tuple[dict[str, Any], bool]:
    """Place the order; return it and whether it is a replay. Committed on return.

    With a key, `pglayer.IdempotencyKeys` claims it first in the order's transaction: a
    concurrent request with the same key waits on it, then replays the stored order; a
    rollback takes the key with it. That transaction is replayed whole on serialization
    failures, deadlocks or a connection lost before COMMIT. Without a key the order is
    one statement, replayed only if it was never sent: a connection lost while it ran
    leaves its outcome unknown (`CommitIndeterminateError`), which is what keys are for.
    A row locked past `lock_timeout` is `LockTimeoutError` either way, and no connection
    is held longer.
    """
    if key is None:
        order = await db.run(lambda c: _place(c, body), lock_timeout=lock_timeout)
        return order, False
    digest = request_hash(body)
    return await db.run_in_transaction(
        lambda c: keys.run(c, "orders", key, digest, lambda c: _place(c, body)),
        lock_timeout=lock_timeout,
    )
