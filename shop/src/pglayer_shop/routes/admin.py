"""`/admin/db-stats`: pool statistics behind a bearer token."""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from pglayer import Database
from pglayer.fastapi import Problem, get_database, problem_responses
from pglayer_shop.routes import router
from pglayer_shop.settings import ShopSettings

__all__: list[str] = []


# Declares the scheme in OpenAPI; answers None rather than its own 403 (ours: 404 or 401).
_BEARER = HTTPBearer(auto_error=False)


async def require_admin(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)],
) -> None:
    """404 when no admin token is configured; 401 unless `Bearer <token>` matches it."""
    settings: ShopSettings = request.app.state.shop_settings
    if settings.admin_token is None:
        raise Problem(404, "not_found", "Not Found")
    expected = settings.admin_token.get_secret_value().encode()
    given = b"" if credentials is None else credentials.credentials.strip().encode()
    # compare_digest takes the same time wherever the first difference is.
    if credentials is None or not hmac.compare_digest(given, expected):
        raise Problem(
            401,
            "unauthorized",
            "A valid bearer token is required.",
            headers={"WWW-Authenticate": 'Bearer realm="admin"'},
        )


@router.get(
    "/admin/db-stats",
    tags=["admin"],
    dependencies=[Depends(require_admin)],
    responses=problem_responses(401, 404),
)
async def db_stats(db: Annotated[Database, Depends(get_database)]) -> dict[str, Any]:
    """Each pool (primary, replicas): sizes, waiting, histograms, counters; replica health."""
    pools: dict[str, Any] = {}
    for pool in db.pools():
        pools[pool.name] = pool.stats().as_dict()
        if db.replicas is not None and pool.name in db.replicas.health:
            health = db.replicas.health[pool.name]
            pools[pool.name]["replica"] = {
                "healthy": health.healthy,
                "reason": health.reason,
                "lag_seconds": health.lag_seconds,
            }
    return {"pools": pools}
