"""`@transactional()`: the tutorial's read-modify-write handler, unchanged, never oversells."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

from pglayer import Connection, Database
from pglayer.fastapi import WriteTransaction, setup
from pglayer.fastapi._transactional import transactional
from tests.conftest import asgi_client, settings_for


class OrderIn(BaseModel):
    product_id: int
    quantity: int


class OrderOut(BaseModel):
    id: int
    product_id: int
    quantity: int


def tutorial_app(db: Database) -> FastAPI:
    app = FastAPI()
    setup(app, db)

    @app.post("/orders", status_code=201)
    @transactional()
    async def create_order(body: OrderIn, conn: Connection) -> OrderOut:
        # As the tutorial writes it: read, check, write. Racy without the decorator.
        stock = await conn.fetchval("SELECT stock FROM products WHERE id = $1", body.product_id)
        if stock is None:
            raise HTTPException(404, "no such product")
        if stock < body.quantity:
            raise HTTPException(409, "insufficient stock")
        await conn.execute(
            "UPDATE products SET stock = $1 WHERE id = $2", stock - body.quantity, body.product_id
        )
        order_id = await conn.fetchval(
            "INSERT INTO orders (user_id, product_id, quantity, unit_price, total)"
            " VALUES (1, $1, $2, 1, $3) RETURNING id",
            body.product_id,
            body.quantity,
            body.quantity,
        )
        return OrderOut(id=order_id, product_id=body.product_id, quantity=body.quantity)

    return app


async def test_two_hundred_concurrent_orders_on_a_stock_of_ten(db_url: str) -> None:
    async with Database(settings_for(db_url, max_size=8, acquire_timeout=10)) as db:
        await db.run(
            lambda conn: conn.execute(
                "INSERT INTO users (id, name, email) VALUES (1, 'T', 't@example.com');"
                "INSERT INTO accounts (user_id, balance) VALUES (1, 0);"
                "INSERT INTO products (id, name, price, stock) VALUES (1, 'P', 1, 10)"
            )
        )
        async with asgi_client(tutorial_app(db)) as client:
            responses = await asyncio.gather(
                *(client.post("/orders", json={"product_id": 1, "quantity": 1}) for _ in range(200))
            )
        statuses = Counter(r.status_code for r in responses)
        assert statuses == {201: 10, 409: 190}
        stock = await db.run(lambda conn: conn.fetchval("SELECT stock FROM products WHERE id = 1"))
        orders = await db.run(lambda conn: conn.fetchval("SELECT count(*) FROM orders"))
        assert (stock, orders) == (0, 10)


async def test_the_handlers_openapi_hides_the_connection(db: Database) -> None:
    async with asgi_client(tutorial_app(db)) as client:
        spec = (await client.get("/openapi.json")).json()
    operation = spec["paths"]["/orders"]["post"]
    assert "parameters" not in operation  # neither `conn` nor the request
    assert operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "OrderIn"
    )


async def test_an_answer_its_response_model_refuses_rolls_the_change_back(db: Database) -> None:
    app = FastAPI()
    setup(app, db)

    @app.post("/orders", status_code=201)
    @transactional()
    async def create_order(body: OrderIn, conn: Connection) -> OrderOut:
        order_id = await conn.fetchval(
            "INSERT INTO orders (user_id, product_id, quantity, unit_price, total)"
            " VALUES (1, $1, $2, 1, 1) RETURNING id",
            body.product_id,
            body.quantity,
        )
        return {"id": order_id}  # type: ignore[return-value]  # not an OrderOut: a 500

    await db.run(
        lambda conn: conn.execute(
            "INSERT INTO users (id, name, email) VALUES (1, 'T', 't@example.com');"
            "INSERT INTO products (id, name, price, stock) VALUES (1, 'P', 1, 10)"
        )
    )
    async with asgi_client(app) as client:
        response = await client.post("/orders", json={"product_id": 1, "quantity": 1})
    assert response.status_code == 500
    assert await db.run(lambda conn: conn.fetchval("SELECT count(*) FROM orders")) == 0


def test_a_handler_taking_a_transaction_dependency_is_told_to_take_a_plain_connection() -> None:
    async def handler(conn: WriteTransaction) -> None:
        pass

    with pytest.raises(TypeError, match=r"plain.*not `WriteTransaction`"):
        transactional()(handler)
