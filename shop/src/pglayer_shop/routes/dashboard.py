"""`/dashboard/{user_id}`: the user, recent orders and balance in one answer."""

from __future__ import annotations

from typing import Any

from fastapi import Request, Response

from pglayer import Connection, Database, Record, gather
from pglayer.fastapi import Db, Problem, json_response, problem_responses
from pglayer_shop.models import Dashboard
from pglayer_shop.orders import ORDER_COLUMNS
from pglayer_shop.routes import router
from pglayer_shop.routes.params import UserId
from pglayer_shop.routes.users import USER_COLUMNS
from pglayer_shop.settings import ShopSettings

__all__ = ["DASHBOARD_SQL"]

# One round trip, and the answer is built by PostgreSQL: the bytes go out as they come.
# Money leaves as text (no float ever touches it); times as the rest of the API writes them.
DASHBOARD_SQL = """
SELECT json_build_object(
    'user', json_build_object('id', u.id, 'name', u.name, 'email', u.email,
                              'created_at', shop_json_time(u.created_at)),
    'recent_orders', coalesce((
        SELECT json_agg(json_build_object(
                   'id', o.id, 'user_id', o.user_id, 'product_id', o.product_id,
                   'quantity', o.quantity, 'unit_price', o.unit_price::text,
                   'total', o.total::text, 'created_at', shop_json_time(o.created_at))
               ORDER BY o.created_at DESC, o.id DESC)
        FROM (SELECT * FROM orders
              WHERE user_id = u.id AND created_at > now() - interval '30 days'
              ORDER BY created_at DESC, id DESC LIMIT 20) AS o
    ), '[]'),
    'balance', a.balance::text)::text
FROM users AS u JOIN accounts AS a ON a.user_id = u.id
WHERE u.id = $1
"""
_RECENT = f"""
SELECT {ORDER_COLUMNS} FROM orders
WHERE user_id = $1 AND created_at > now() - interval '30 days'
ORDER BY created_at DESC, id DESC LIMIT 20
"""


async def _single(db: Database, user_id: int) -> str | None:
    text: str | None = await db.read(lambda conn: conn.fetchval(DASHBOARD_SQL, user_id))
    return text


async def _concurrent(db: Database, user_id: int) -> dict[str, Any] | None:
    async def user(conn: Connection) -> Record | None:
        return await conn.fetchrow(f"SELECT {USER_COLUMNS} FROM users WHERE id = $1", user_id)

    async def orders(conn: Connection) -> list[Record]:
        return await conn.fetch(_RECENT, user_id)

    async def balance(conn: Connection) -> Any:
        return await conn.fetchval("SELECT balance FROM accounts WHERE user_id = $1", user_id)

    found, recent, money = await gather(db, user, orders, balance, max_connections=3, read=True)
    if found is None or money is None:
        return None
    return {"user": found, "recent_orders": recent, "balance": money}


@router.get(
    "/dashboard/{user_id}",
    tags=["dashboard"],
    response_model=Dashboard,
    responses=problem_responses(404, 422),
)
async def dashboard(user_id: UserId, db: Db, request: Request) -> Response:
    """The user, up to 20 orders of the last 30 days (newest first), and the balance."""
    settings: ShopSettings = request.app.state.shop_settings
    build = _concurrent if settings.dashboard_strategy == "concurrent" else _single
    result = await build(db, user_id)
    if result is None:
        raise Problem(404, "not_found", f"User {user_id} does not exist.")
    return json_response(result)
