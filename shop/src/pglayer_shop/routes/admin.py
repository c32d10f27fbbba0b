"""The operator's routes: the library's admin router, and `/admin/users/export`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from pydantic import SecretStr
from starlette.responses import Response

from pglayer import Database
from pglayer.fastapi import (
    admin_guard,
    admin_router,
    get_database,
    ndjson_response,
    problem_responses,
)

__all__ = ["admin_routers"]

_EXPORT = "SELECT id, name, email, created_at FROM users ORDER BY id"


def admin_routers(token: SecretStr | None) -> list[APIRouter]:
    """`/admin/db-stats` (the library's) and the user export, behind the same bearer token."""
    export = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(admin_guard(token))])

    @export.get(
        "/users/export",
        response_class=Response,
        responses={
            200: {"content": {"application/x-ndjson": {}}, "description": "One user per line"},
            **problem_responses(401, 404),
        },
    )
    async def export_users(db: Annotated[Database, Depends(get_database)]) -> Response:
        """Every user, one JSON object per line, streamed from a server-side cursor."""
        response = await ndjson_response(db, _EXPORT)
        response.headers["Cache-Control"] = "no-store"  # every user's e-mail
        return response

    return [admin_router(token=token), export]
