"""`/users`: read one, list by id, create with its account."""

from __future__ import annotations

from fastapi import APIRouter, Response

from pglayer import UniqueViolationError
from pglayer.fastapi import Db, Problem, WriteTransaction, problem_responses
from pglayer_shop.models import Page, User, UserCreate
from pglayer_shop.pagination import After, Limit, page_by_id
from pglayer_shop.routes.params import UserId

__all__ = ["router"]

router = APIRouter(tags=["users"])

_USER_COLUMNS = "id, name, email, created_at"


@router.get("/users/{user_id}", responses=problem_responses(404, 422))
async def get_user(user_id: UserId, db: Db) -> User:
    user = await db.read(
        lambda conn: conn.fetch_one(
            User, f"SELECT {_USER_COLUMNS} FROM users WHERE id = $1", user_id
        )
    )
    if user is None:
        raise Problem(404, "not_found", f"User {user_id} does not exist.")
    return user


@router.get("/users", responses=problem_responses(422))
async def list_users(db: Db, limit: Limit = 50, after: After = None) -> Page[User]:
    return await page_by_id(db, User, _USER_COLUMNS, "users", limit, after)


@router.post(
    "/users",
    status_code=201,
    responses=problem_responses(409, 413, 422, _409="Email already registered (`conflict`)"),
)
async def create_user(body: UserCreate, conn: WriteTransaction, response: Response) -> User:
    try:
        user = await conn.fetch_one(
            User,
            f"""
            WITH new_user AS (
                INSERT INTO users (name, email) VALUES ($1, $2) RETURNING {_USER_COLUMNS}
            ), new_account AS (
                INSERT INTO accounts (user_id) SELECT id FROM new_user
            )
            SELECT {_USER_COLUMNS} FROM new_user
            """,
            body.name,
            body.email,
        )
    except UniqueViolationError as exc:
        if exc.constraint == "users_email_key":
            raise Problem(409, "conflict", "A user with this email already exists.") from exc
        raise
    assert user is not None
    response.headers["Location"] = f"/users/{user.id}"
    return user
