"""`/users`: read one, list by id, create with its account."""

from __future__ import annotations

from fastapi import Request, Response

from pglayer import UniqueViolationError
from pglayer.fastapi import (
    After,
    Db,
    Limit,
    Page,
    Problem,
    json_response,
    problem_responses,
)
from pglayer_shop.models import User, UserCreate
from pglayer_shop.routes import router
from pglayer_shop.routes.cursors import cursors_of
from pglayer_shop.routes.params import UserId, created

__all__ = ["USER_COLUMNS"]

USER_COLUMNS = "id, name, email, created_at"
_GET = f"SELECT {USER_COLUMNS} FROM users WHERE id = $1"


@router.get(
    "/users/{user_id}", tags=["users"], response_model=User, responses=problem_responses(404, 422)
)
async def get_user(user_id: UserId, db: Db) -> Response:
    row = await db.read(lambda conn: conn.fetchrow(_GET, user_id))
    if row is None:
        raise Problem(404, "not_found", f"User {user_id} does not exist.")
    return json_response(row)


_LIST = f"SELECT {USER_COLUMNS} FROM users WHERE id > $1 ORDER BY id LIMIT $2"


@router.get("/users", tags=["users"], response_model=Page[User], responses=problem_responses(422))
async def list_users(request: Request, db: Db, limit: Limit = 50, after: After = None) -> Response:
    cursors = await cursors_of(request, db)
    return json_response(await cursors.page_by_id(db, _LIST, limit, after, of="users"))


_CREATE = f"""
    WITH new_user AS (
        INSERT INTO users (name, email) VALUES ($1, $2) RETURNING {USER_COLUMNS}
    ), new_account AS (
        INSERT INTO accounts (user_id) SELECT id FROM new_user
    )
    SELECT {USER_COLUMNS} FROM new_user
"""


@router.post(
    "/users",
    tags=["users"],
    status_code=201,
    responses={
        **problem_responses(409, 413, 422, _409="Email already registered (`conflict`)"),
        **created(),
    },
)
async def create_user(body: UserCreate, db: Db, response: Response) -> User:
    # `db`, not a connection dependency: FastAPI solves dependencies before it validates the
    # body, so an invalid body would hold a connection (and get 503 while the database is down).
    try:
        user = await db.run_in_transaction(
            lambda conn: conn.fetch_one(User, _CREATE, body.name, body.email)
        )
    except UniqueViolationError as exc:
        if exc.constraint == "users_email_key":
            raise Problem(409, "conflict", "A user with this email already exists.") from exc
        raise
    assert user is not None
    response.headers["Location"] = f"/users/{user.id}"
    return user
