"""Token-protected operator routes: `app.include_router(admin_router(token=...))`.

No token configured: every admin route is a 404 (it does not exist). A token configured: a
request without `Authorization: Bearer <token>`, with another token, or with two
`Authorization` headers, is a 401. The live
pool page (`{prefix}/pool`, see `pglayer.fastapi._live`) also takes a short-lived session
cookie that its form exchanges for the token.
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from pglayer._database import Database
from pglayer._errors import ConfigurationError
from pglayer.fastapi._dependencies import get_database
from pglayer.fastapi._live import SESSION_TTL, add_live_routes
from pglayer.fastapi._problems import Problem, problem_responses

__all__ = ["admin_guard", "admin_router"]

log = logging.getLogger("pglayer")

# Declares the bearer scheme in OpenAPI; answers None rather than its own 403 (ours: 404/401).
_BEARER = HTTPBearer(auto_error=False, description="`PGLAYER_ADMIN_TOKEN`")

Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]


_SHORT_TOKEN = 16  # characters; below it a token is warned of (guessed at ~4,000 tries/s)


def _token_bytes(token: SecretStr | str | None) -> bytes | None:
    if token is None:
        return None
    raw = token.get_secret_value() if isinstance(token, SecretStr) else token
    if raw and raw.strip() != raw:
        # A header's value is read without the spaces at its ends: it could never match.
        raise ConfigurationError("the admin token has spaces at its ends: no request can send it")
    if raw and not all("!" <= c <= "~" for c in raw):
        # Header values are read as Latin-1, what clients send as UTF-8: no usual client
        # could send such a token in `Authorization` as it is written.
        raise ConfigurationError(
            "the admin token must be printable ASCII, without spaces (letters, digits,"
            " punctuation): clients could not send it in an Authorization header"
        )
    return raw.encode() if raw else None


_NO_STORE = {"Cache-Control": "no-store"}


def admin_guard(token: SecretStr | str | None) -> Callable[..., Awaitable[None]]:
    """A dependency: 404 without a configured `token`, 401 unless the bearer token matches."""
    expected = _token_bytes(token)

    async def require_admin(request: Request, response: Response, credentials: Credentials) -> None:
        # What the operator's routes answer is for the operator: no cache keeps it (FastAPI
        # adds this to what a route returns, unless it returns a Response of its own).
        response.headers.update(_NO_STORE)
        if expected is None:
            raise Problem(404, "not_found", "Not Found", headers=_NO_STORE)
        given = b"" if credentials is None else credentials.credentials.strip().encode()
        # Two Authorization headers are ambiguous (which one did a proxy check?): refused.
        twice = len(request.headers.getlist("authorization")) > 1
        # compare_digest takes the same time wherever the first difference is.
        if not hmac.compare_digest(given, expected) or twice:
            raise Problem(
                401,
                "unauthorized",
                "A valid bearer token is required.",
                headers={"WWW-Authenticate": 'Bearer realm="admin"', **_NO_STORE},
            )

    return require_admin


def admin_router(
    *,
    token: SecretStr | str | None,
    prefix: str = "/admin",
    session_ttl: float = SESSION_TTL,
) -> APIRouter:
    """`GET {prefix}/db-stats`: every pool's sizes, waits, counters and replica health;
    `GET {prefix}/pool`: the live pool page (its session cookie lasts `session_ttl` seconds).
    """
    router = APIRouter(prefix=prefix, tags=["admin"], responses=problem_responses(401, 404))

    @router.get("/db-stats", dependencies=[Depends(admin_guard(token))])
    async def db_stats(db: Annotated[Database, Depends(get_database)]) -> dict[str, Any]:
        """Each pool (primary, replicas) of the worker process that answers (`worker`, its
        PID; `/metrics` adds up every worker): sizes, waiting, histograms, counters; replica
        health."""
        return {"worker": os.getpid(), "pools": pool_stats(db)}

    expected = _token_bytes(token)
    if expected is not None and len(expected) < _SHORT_TOKEN:
        log.warning(
            "the admin token is %d characters long: short enough to guess; use a random one"
            " of 32 or more (python -c 'import secrets; print(secrets.token_urlsafe(32))')",
            len(expected),
        )
    add_live_routes(router, token=expected, session_ttl=session_ttl)
    return router


def pool_stats(db: Database) -> dict[str, Any]:
    """Every pool's statistics as JSON-ready dicts, with each replica's health."""
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
    return pools
