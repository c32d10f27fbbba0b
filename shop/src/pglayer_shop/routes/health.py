"""Liveness and readiness."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from pglayer import Database, PglayerError
from pglayer.fastapi import Problem, get_database, problem_responses
from pglayer_shop.routes import router
from pglayer_shop.settings import ShopSettings

__all__: list[str] = []


class Health(BaseModel):
    status: str
    pools: dict[str, str] = {}


@router.get("/health/live", tags=["health"])
async def live() -> Health:
    """200 while the process serves requests."""
    return Health(status="ok")


@router.get("/health/ready", tags=["health"], responses=problem_responses())
async def ready(request: Request, db: Annotated[Database, Depends(get_database)]) -> Health:
    """200 when the database answers `SELECT 1` within its deadline, else 503."""
    settings: ShopSettings = request.app.state.shop_settings
    try:
        await db.ping(timeout=settings.ready_timeout)
    except PglayerError:
        raise Problem(
            503,
            "unavailable",
            "The database is not answering.",
            pools={db.name: "unavailable"},
        ) from None
    pools = {db.name: "ok"}
    if db.replicas is not None:
        # Replicas are reported, not required: reads fall back to the primary.
        pools.update({name: h.reason for name, h in db.replicas.health.items()})
    return Health(status="ok", pools=pools)


@router.get("/metrics", tags=["health"], response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus text exposition: HTTP requests by route and status, pool state and counters."""
    return Response(generate_latest(request.app.state.metrics), media_type=CONTENT_TYPE_LATEST)
