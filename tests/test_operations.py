"""What every app needs, one call each: /metrics, /health/live|ready, token-protected stats."""

from __future__ import annotations

from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from pglayer import Database
from pglayer.fastapi import setup
from pglayer.fastapi._admin import admin_router
from pglayer.fastapi._health import health_router
from pglayer.fastapi._metrics import setup_metrics
from tests.conftest import asgi_client


def operated_app(db: Database, token: str | None) -> FastAPI:
    app = FastAPI()
    setup(app, db)
    setup_metrics(app, db)
    app.include_router(health_router())
    app.include_router(admin_router(token=token))
    return app


async def test_metrics_are_mounted_by_one_call(db: Database) -> None:
    async with asgi_client(operated_app(db, None)) as client:
        await client.get("/health/ready")
        text = (await client.get("/metrics")).text
    names = {family.name for family in text_string_to_metric_families(text)}
    assert {"pglayer_pool_in_use", "pglayer_http_requests"} <= names


async def test_health_routes_answer(db: Database) -> None:
    async with asgi_client(operated_app(db, None)) as client:
        assert (await client.get("/health/live")).json() == {"status": "ok", "pools": {}}
        ready = await client.get("/health/ready")
    assert ready.status_code == 200
    assert ready.json()["pools"] == {"primary": "ok"}


async def test_db_stats_need_the_bearer_token(db: Database) -> None:
    async with asgi_client(operated_app(db, "s3cret")) as client:
        missing = await client.get("/admin/db-stats")
        wrong = await client.get("/admin/db-stats", headers={"Authorization": "Bearer nope"})
        right = await client.get("/admin/db-stats", headers={"Authorization": "Bearer s3cret"})
    assert (missing.status_code, wrong.status_code, right.status_code) == (401, 401, 200)
    assert right.json()["pools"]["primary"]["max_size"] == db.settings.max_size


async def test_without_a_token_the_admin_routes_do_not_exist(db: Database) -> None:
    async with asgi_client(operated_app(db, None)) as client:
        response = await client.get("/admin/db-stats", headers={"Authorization": "Bearer x"})
    assert response.status_code == 404


async def test_the_admin_routes_declare_a_bearer_scheme(db: Database) -> None:
    async with asgi_client(operated_app(db, "t")) as client:
        spec = (await client.get("/openapi.json")).json()
    schemes = spec["components"]["securitySchemes"]
    assert any(s == {"type": "http", "scheme": "bearer", "description": "`PGLAYER_ADMIN_TOKEN`"}
               for s in schemes.values())  # fmt: skip
    assert spec["paths"]["/admin/db-stats"]["get"]["security"]
