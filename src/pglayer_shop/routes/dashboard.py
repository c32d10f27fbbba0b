"""`/dashboard/{user_id}`: the user, recent orders and balance in one answer."""

from __future__ import annotations

from fastapi import APIRouter, Request

from pglayer import Connection, Database
from pglayer.concurrent import gather
from pglayer.fastapi import Db, Problem, problem_responses
from pglayer_shop.models import Account, Dashboard, Order, User
from pglayer_shop.orders import ORDER_COLUMNS
from pglayer_shop.routes.params import UserId
from pglayer_shop.settings import ShopSettings

__all__ = ["router"]

router = APIRouter(tags=["dashboard"])

# One round trip. Money leaves the database as text so no float ever touches it.
DASHBOARD_SQL = """
SELECT u.id, u.name, u.email, u.created_at, a.balance,
       coalesce((
           SELECT json_agg(json_build_object(
                      'id', o.id, 'user_id', o.user_id, 'product_id', o.product_id,
                      'quantity', o.quantity, 'unit_price', o.unit_price::text,
                      'total', o.total::text, 'created_at', o.created_at)
                  ORDER BY o.created_at DESC, o.id DESC)
           FROM (SELECT * FROM orders
                 WHERE user_id = u.id AND created_at > now() - interval '30 days'
                 ORDER BY created_at DESC, id DESC LIMIT 20) AS o
       ), '[]') AS recent_orders
FROM users AS u JOIN accounts AS a ON a.user_id = u.id
WHERE u.id = $1
"""
_RECENT = f"""
SELECT {ORDER_COLUMNS} FROM orders
WHERE user_id = $1 AND created_at > now() - interval '30 days'
ORDER BY created_at DESC, id DESC LIMIT 20
"""


async def _single(db: Database, user_id: int) -> Dashboard | None:
    row = await db.read(lambda conn: conn.fetchrow(DASHBOARD_SQL, user_id))
    if row is None:
        return None
    return Dashboard(
        user=User(id=row["id"], name=row["name"], email=row["email"], created_at=row["created_at"]),
        # json is decoded by the pool's codec; money arrives as text, dates as ISO strings.
        recent_orders=[Order.model_validate(o) for o in row["recent_orders"]],
        balance=row["balance"],
    )


async def _concurrent(db: Database, user_id: int) -> Dashboard | None:
    async def user(conn: Connection) -> User | None:
        return await conn.fetch_one(
            User, "SELECT id, name, email, created_at FROM users WHERE id = $1", user_id
        )

    async def orders(conn: Connection) -> list[Order]:
        return await conn.fetch_all(Order, _RECENT, user_id)

    async def account(conn: Connection) -> Account | None:
        return await conn.fetch_one(
            Account, "SELECT user_id, balance FROM accounts WHERE user_id = $1", user_id
        )

    found, recent, balance = await gather(db, user, orders, account, max_connections=3)
    if found is None or balance is None:
        return None
    return Dashboard(user=found, recent_orders=recent, balance=balance.balance)


@router.get("/dashboard/{user_id}", responses=problem_responses(404, 422))
async def dashboard(user_id: UserId, db: Db, request: Request) -> Dashboard:
    """The user, up to 20 orders of the last 30 days (newest first), and the balance."""
    settings: ShopSettings = request.app.state.shop_settings
    build = _concurrent if settings.dashboard_strategy == "concurrent" else _single
    result = await build(db, user_id)
    if result is None:
        raise Problem(404, "not_found", f"User {user_id} does not exist.")
    return result
