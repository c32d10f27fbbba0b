"""`/orders` and `/users/{id}/orders`."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Header, Path, Response
from pydantic import TypeAdapter

from pglayer import Connection
from pglayer.fastapi import Db, Problem, problem_responses
from pglayer_shop.models import MAX_ID, Order, OrderCreate, Page
from pglayer_shop.orders import ORDER_COLUMNS, place_order
from pglayer_shop.pagination import After, Limit, decode_cursor, encode_cursor
from pglayer_shop.routes.params import UserId

__all__ = ["router"]

router = APIRouter(tags=["orders"])

OrderId = Annotated[int, Path(gt=0, le=MAX_ID, description="A positive 64-bit id")]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=200,
        description="Send the same key again to get the same order back, never a second one",
    ),
]
_CURSOR = TypeAdapter(tuple[datetime, int])


@router.post(
    "/orders",
    status_code=201,
    responses=problem_responses(
        404,
        409,
        413,
        422,
        _409="`insufficient_stock` or `insufficient_funds`; nothing changed",
        _422="Invalid body, or `idempotency_key_reused` with a different body",
    ),
)
async def create_order(
    body: OrderCreate, db: Db, response: Response, idempotency_key: IdempotencyKey = None
) -> Order:
    """Decrement stock, debit the balance and write the order, in one transaction."""
    if idempotency_key is not None and "\x00" in idempotency_key:
        raise Problem(422, "validation_error", "Idempotency-Key must not contain NUL.")
    # Replayed whole on serialization failures, deadlocks or a connection lost before
    # COMMIT; committed before the response is sent.
    order, replayed = await db.run_in_transaction(
        lambda conn: place_order(conn, body, idempotency_key)
    )
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = f"/orders/{order.id}"
    return order


@router.get("/orders/{order_id}", responses=problem_responses(404, 422))
async def get_order(order_id: OrderId, db: Db) -> Order:
    order = await db.read(
        lambda conn: conn.fetch_one(
            Order, f"SELECT {ORDER_COLUMNS} FROM orders WHERE id = $1", order_id
        )
    )
    if order is None:
        raise Problem(404, "not_found", f"Order {order_id} does not exist.")
    return order


@router.get("/users/{user_id}/orders", responses=problem_responses(404, 422))
async def list_user_orders(
    user_id: UserId, db: Db, limit: Limit = 50, after: After = None
) -> Page[Order]:
    """The user's orders, newest first (served by `orders_user_recent_idx`)."""
    at, last_id = decode_cursor(after, _CURSOR) if after else (None, 0)

    async def read(conn: Connection) -> tuple[list[Order], bool]:
        orders = await conn.fetch_all(
            Order,
            f"""
            SELECT {ORDER_COLUMNS} FROM orders
            WHERE user_id = $1 AND ($2::timestamptz IS NULL OR (created_at, id) < ($2, $3))
            ORDER BY created_at DESC, id DESC
            LIMIT $4
            """,
            user_id,
            at,
            last_id,
            limit + 1,
        )
        exists = bool(orders) or bool(
            await conn.fetchval("SELECT EXISTS (SELECT 1 FROM users WHERE id = $1)", user_id)
        )
        return orders, exists

    orders, exists = await db.read(read)
    if not exists:
        raise Problem(404, "not_found", f"User {user_id} does not exist.")
    next_cursor = None
    if len(orders) > limit:
        last = orders[limit - 1]
        next_cursor = encode_cursor(last.created_at.isoformat(), last.id)
    return Page[Order](items=orders[:limit], next_cursor=next_cursor)
