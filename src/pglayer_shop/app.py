"""The shop application factory."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from pglayer import Database, DatabaseSettings
from pglayer._logs import configure_logging
from pglayer.fastapi import admin_router, setup
from pglayer.fastapi._metrics import setup_metrics
from pglayer_shop.orders import sweep_forever
from pglayer_shop.routes import router
from pglayer_shop.settings import ShopSettings

__all__ = ["create_app"]


def create_app(db: Database | None = None, settings: ShopSettings | None = None) -> FastAPI:
    """Build the shop; with no arguments, from `DATABASE_URL` and `PGLAYER_*`."""
    settings = settings if settings is not None else ShopSettings()
    db = db if db is not None else Database(DatabaseSettings())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Runs inside pglayer's lifespan (see `setup`): the pool is open here.
        sweep = asyncio.create_task(
            sweep_forever(db, settings.idempotency_key_ttl, settings.idempotency_sweep_interval)
        )
        try:
            yield
        finally:
            sweep.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweep

    app = FastAPI(
        lifespan=lifespan,
        # The routes themselves, not an included router: FastAPI matches an included
        # router's routes through an extra layer on every request.
        routes=router.routes,
        title="pglayer shop",
        version="0.1.0",
        description="The reference service of pglayer. Errors are RFC 9457 problem documents.",
    )
    if settings.log_format is not None:
        configure_logging(format=settings.log_format, level=settings.log_level)
    app.state.shop_settings = settings
    app.include_router(admin_router(token=settings.admin_token))  # /admin/db-stats, /admin/pool
    setup(
        app,
        db,
        max_body_size=settings.max_body_size,
        access_log=settings.access_log,
        freeze_gc=settings.freeze_gc,
        # What an operator needs while the pool is saturated is never shed.
        shed_exempt=("/health/", "/metrics", "/admin/"),
    )
    app.state.metrics = setup_metrics(app, db, path=None, http=settings.metrics)
    return app
