"""`/accounts`: balances."""

from __future__ import annotations

from fastapi import APIRouter

from pglayer.fastapi import Db, Problem, problem_responses
from pglayer_shop.models import Account
from pglayer_shop.routes.params import UserId

__all__ = ["router"]

router = APIRouter(tags=["accounts"])


@router.get("/accounts/{user_id}", responses=problem_responses(404, 422))
async def get_account(user_id: UserId, db: Db) -> Account:
    account = await db.read(
        lambda conn: conn.fetch_one(
            Account, "SELECT user_id, balance FROM accounts WHERE user_id = $1", user_id
        )
    )
    if account is None:
        raise Problem(404, "not_found", f"Account of user {user_id} does not exist.")
    return account
