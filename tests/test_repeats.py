"""A query parameter or header a route takes one value of, sent twice, is a 422 naming it."""

from __future__ import annotations

from typing import Any

import httpx
from fastapi import FastAPI, Header, Query

from pglayer import Database
from pglayer.fastapi import setup
from tests.conftest import asgi_client
from tests.test_shop_orders import funded_user, make_product, stock
from tests.test_shop_users import assert_problem


def build_app(db: Database) -> FastAPI:
    app = FastAPI()
    setup(app, db)

    @app.get("/things")
    async def things(
        limit: int = 5,
        tag: list[str] = Query([]),  # noqa: B008  (FastAPI's way)
        x_token: str | None = Header(None),
    ) -> dict[str, Any]:
        return {"limit": limit, "tags": tag, "token": x_token}

    return app


async def test_a_list_parameter_may_repeat(db: Database) -> None:
    app = build_app(db)
    async with app.router.lifespan_context(app), asgi_client(app) as client:
        response = await client.get("/things?tag=a&tag=b&limit=3", headers={"X-Token": "t"})
    assert response.json() == {"limit": 3, "tags": ["a", "b"], "token": "t"}


async def test_a_scalar_query_parameter_given_twice_is_422(db: Database) -> None:
    app = build_app(db)
    async with app.router.lifespan_context(app), asgi_client(app) as client:
        response = await client.get("/things?limit=1&tag=a&li%6Dit=2")
    problem = assert_problem(response, 422, "validation_error")
    assert problem["errors"][0]["loc"] == ["query", "limit"]


async def test_a_scalar_header_given_twice_is_422(db: Database) -> None:
    app = build_app(db)
    async with app.router.lifespan_context(app), asgi_client(app) as client:
        response = await client.get("/things", headers=[("X-Token", "a"), ("x-token", "b")])
    problem = assert_problem(response, 422, "validation_error")
    assert problem["errors"][0]["loc"] == ["header", "X-Token"]


async def test_an_order_with_two_idempotency_keys_is_422_and_not_placed(
    client: httpx.AsyncClient,
) -> None:
    user = await funded_user(client, "a@example.com")
    product = await make_product(client)
    body = {"user_id": user, "product_id": product, "quantity": 1}
    keys = [("Idempotency-Key", "dup-1"), ("Idempotency-Key", "dup-2")]
    response = await client.post("/orders", json=body, headers=keys)
    problem = assert_problem(response, 422, "validation_error")
    assert problem["errors"][0]["loc"] == ["header", "Idempotency-Key"]
    assert await stock(client, product) == 10
