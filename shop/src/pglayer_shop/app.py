"""The shop application factory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.telemetry import TelemetryConfig

from pglayer import (
    ConfigurationError,
    Database,
    DatabaseSettings,
    IdempotencyKeys,
    TransientError,
)
from pglayer.fastapi import Cursors, health_router, setup, setup_metrics
from pglayer.migrations import MigrationError
from pglayer_shop.orders import OrderBatches
from pglayer_shop.routes import router
from pglayer_shop.routes.admin import admin_routers
from pglayer_shop.schema import pending
from pglayer_shop.settings import ShopSettings

__all__ = ["create_app"]

_NO_TELEMETRY: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False}


async def _check_schema(db: Database) -> None:
    """Refuse to start on a database whose schema is older than the shop's code (served by
    `pglayer serve` without its migrations: readiness said 200, and routes were 500s)."""
    try:
        missing = await pending(db)
    except TransientError:
        return  # not reachable yet: the pool opens in the background, and routes say 503
    except MigrationError as exc:
        raise ConfigurationError(f"this database's schema does not fit the shop: {exc}") from None
    if missing:
        raise ConfigurationError(
            f"this database's schema is older than the shop ({len(missing)} migrations not"
            f" applied: {', '.join(missing)}): run `pglayer-shop migrate` first, or serve it"
            " with `pglayer-shop serve`, which migrates"
        )


def create_app(db: Database | None = None, settings: ShopSettings | None = None) -> FastAPI:
    """Build the shop; with no arguments, from `DATABASE_URL` and `PGLAYER_*`."""
    settings = settings if settings is not None else ShopSettings()
    db = db if db is not None else Database(DatabaseSettings())
    keys = IdempotencyKeys(ttl=settings.idempotency_key_ttl)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Runs inside pglayer's lifespan (see `setup`): the pool is open here.
        await _check_schema(db)
        async with keys.sweeping(db, settings.idempotency_sweep_interval):
            yield

    app = FastAPI(
        lifespan=lifespan,
        # The routes themselves, not an included router: FastAPI matches an included
        # router's routes through an extra layer on every request.
        routes=router.routes,
        # `/users/1/` is not a route: 404, rather than a redirect built from the Host header.
        redirect_slashes=False,
        title="pglayer shop",
        version="0.1.0",
        description="The reference service of pglayer. Errors are RFC 9457 problem documents.",
        telemetry=None if settings.opentelemetry else _NO_TELEMETRY,
    )
    app.state.shop_settings = settings
    setup(
        app,
        db,
        server=settings,  # body bound, access log, logging
        # What an operator needs while the pool is saturated is never shed.
        shed_exempt=("/health/", "/metrics", "/admin/"),
    )
    setup_metrics(app, db, http=settings.metrics)  # GET /metrics
    app.include_router(health_router(ready_timeout=settings.ready_timeout))
    # /admin/db-stats and /admin/pool (the library's), /admin/users/export (the shop's).
    for admin in admin_routers(settings.admin_token):
        app.include_router(admin)
    app.state.idempotency_keys = keys
    app.state.order_batches = OrderBatches(
        db, lock_timeout=settings.write_lock_timeout, max_batch=settings.order_batch_size
    )
    if settings.cursor_secret is not None:
        app.state.cursors = Cursors(settings.cursor_secret.get_secret_value())
    return app
