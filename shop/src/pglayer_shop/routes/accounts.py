"""`/accounts`: balances."""

from __future__ import annotations

from fastapi import Response

from pglayer.fastapi import Db, Problem, json_response, problem_responses
from pglayer_shop.models import Account
from pglayer_shop.routes import router
from pglayer_shop.routes.params import UserId

__all__: list[str] = []

_GET = "SELECT user_id, balance FROM accounts WHERE user_id = $1"


@router.get(
    "/accounts/{user_id}",
    tags=["accounts"],
    response_model=Account,
    responses=problem_responses(404, 422),
)
async def get_account(user_id: UserId, db: Db) -> Response:
    row = await db.read(lambda conn: conn.fetchrow(_GET, user_id))
    if row is None:
        raise Problem(404, "not_found", f"Account of user {user_id} does not exist.")
    return json_response(row)
