"""`/orders` and `/users/{id}/orders`."""

from __future__ import annotations

from fastapi import Request, Response
from pydantic import TypeAdapter

from pglayer import Connection, Record
from pglayer.fastapi import (
    After,
    Db,
    IdempotencyKey,
    Limit,
    Page,
    Problem,
    json_response,
    problem_responses,
)
from pglayer_shop.models import CursorId, CursorTime, Order, OrderCreate
from pglayer_shop.orders import ORDER_COLUMNS, place_order
from pglayer_shop.routes import router
from pglayer_shop.routes.cursors import cursors_of
from pglayer_shop.routes.params import OrderId, UserId, created
from pglayer_shop.settings import ShopSettings

__all__: list[str] = []

_CURSOR = TypeAdapter(tuple[CursorTime, CursorId])


@router.post(
    "/orders",
    tags=["orders"],
    status_code=201,
    response_model=Order,
    responses={
        **problem_responses(
            404,
            409,
            413,
            422,
            _409="`insufficient_stock` or `insufficient_funds`; nothing changed",
            _503="`busy`: the product's row stayed locked past the bound; or `overloaded`,"
            " `unavailable`; with `Retry-After`",
            _422="Invalid body, or `idempotency_key_reused` with a different body",
        ),
        **created(replayable=True),
    },
)
async def create_order(
    body: OrderCreate, db: Db, request: Request, idempotency_key: IdempotencyKey = None
) -> Response:
    """Decrement stock, debit the balance and write the order, all or nothing."""
    settings: ShopSettings = request.app.state.shop_settings
    order, replayed = await place_order(
        db,
        body,
        idempotency_key,
        request.app.state.idempotency_keys,
        settings.write_lock_timeout,
        request.app.state.order_batches,
    )
    headers = {"Location": f"/orders/{order['id']}"}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return json_response(order, status_code=201, headers=headers)


@router.get(
    "/orders/{order_id}",
    tags=["orders"],
    response_model=Order,
    responses=problem_responses(404, 422),
)
async def get_order(order_id: OrderId, db: Db) -> Response:
    order = await db.read(
        lambda conn: conn.fetchrow(f"SELECT {ORDER_COLUMNS} FROM orders WHERE id = $1", order_id)
    )
    if order is None:
        raise Problem(404, "not_found", f"Order {order_id} does not exist.")
    return json_response(order)


@router.get(
    "/users/{user_id}/orders",
    tags=["orders"],
    response_model=Page[Order],
    responses=problem_responses(404, 422),
)
async def list_user_orders(
    request: Request, user_id: UserId, db: Db, limit: Limit = 50, after: After = None
) -> Response:
    """The user's orders, newest first (served by `orders_user_recent_idx`)."""
    cursors = await cursors_of(request, db)
    of = f"orders of user {user_id}"
    at, last_id = cursors.decode(after, _CURSOR, of=of) if after else (None, 0)

    async def read(conn: Connection) -> tuple[list[Record], bool]:
        orders = await conn.fetch(
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
    return json_response(
        cursors.page(orders, limit, lambda o: (o["created_at"].isoformat(), o["id"]), of=of)
    )
