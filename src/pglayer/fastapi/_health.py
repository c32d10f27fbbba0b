"""Liveness and readiness routes for any app on pglayer: `app.include_router(health_router())`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from pglayer._database import Database
from pglayer._errors import (
    DatabaseUnavailableError,
    PglayerError,
    PoolOverloadedError,
    PoolTimeoutError,
    TooManyConnectionsError,
    refusal,
)
from pglayer._settings import ServerSettings
from pglayer.fastapi._dependencies import get_database
from pglayer.fastapi._problems import Problem, problem_responses

__all__ = ["Health", "health_router"]


class Health(BaseModel):
    """`ok`, and each pool's state (replicas are reported, not required)."""

    status: str = Field(examples=["ok"])
    pools: dict[str, str] = Field(default_factory=dict)


_SATURATED = "Every pooled connection is in use: this process cannot take more now."
_REFUSED = (
    "The database refused this process a connection: a connection limit is reached, or it is"
    " closed to connections, starting or stopping."
)
_DOWN = "The database did not answer within the deadline."
_UNREACHABLE = (
    "The database cannot be reached now (nothing listening at its address, or the connection"
    " lost): the log says which."
)


def _state(exc: PglayerError, db: Database) -> str:
    """`saturated`, `refused` or `down`: why the probe got no answer."""
    if isinstance(exc, PoolTimeoutError | PoolOverloadedError):
        # No connection came: the database may be fine and this process's connections all
        # in use; or the pool cannot grow to its size because the server refuses more
        # (another app's connections took its slots); else its connects do not answer.
        if _saturated(db):
            return "saturated"
        return "refused" if db.connect_refused() else "down"
    if isinstance(exc, TooManyConnectionsError | DatabaseUnavailableError) and refusal(exc):
        return "refused"
    return "down"


def _saturated(db: Database) -> bool:
    """Whether the reads' connections (a probe is one) are all in use now."""
    stats = db.stats()
    reads = stats.bulkheads.get("read")
    return stats.in_use >= stats.max_size or (reads is not None and reads.in_use >= reads.cap)


def health_router(*, prefix: str = "/health", ready_timeout: float | None = None) -> APIRouter:
    """`GET {prefix}/live` (200 while serving) and `{prefix}/ready` (200 when the database
    answers `SELECT 1` within `ready_timeout` seconds, default `PGLAYER_READY_TIMEOUT`, else
    503). Never shed under load."""
    timeout = ServerSettings().ready_timeout if ready_timeout is None else ready_timeout
    router = APIRouter(prefix=prefix, tags=["health"])

    @router.get("/live", response_model=Health)
    async def live() -> Health:
        """200 while the process serves requests."""
        return Health(status="ok")

    @router.get("/ready", response_model=Health, responses=problem_responses())
    async def ready(db: Annotated[Database, Depends(get_database)]) -> Health:
        """200 when the database answers within its deadline, else 503."""
        pools = {db.name: "ok"}
        if db.replicas is not None:
            pools.update({name: h.reason for name, h in db.replicas.health.items()})
        try:
            await db.ping(timeout=timeout)
        except PglayerError as exc:
            pools[db.name] = state = _state(exc, db)  # replicas still reported
            detail = {"saturated": _SATURATED, "refused": _REFUSED}.get(state) or (
                _UNREACHABLE if isinstance(exc, DatabaseUnavailableError) else _DOWN
            )
            raise Problem(503, "unavailable", detail, pools=pools) from None
        return Health(status="ok", pools=pools)

    return router
