"""Test-only: the shop with the seed design's read-modify-write order placement.

It exists to prove that the oversell checker can fail: run against this app, it must.
"""

from __future__ import annotations

import asyncio

from fastapi import FastAPI
from pglayer_shop.models import OrderCreate

from pglayer import Database, DatabaseSettings
from pglayer.fastapi import Problem, WriteConnection, setup


def create_app() -> FastAPI:
    app = FastAPI()
    setup(app, Database(DatabaseSettings()))

    @app.get("/health/live")
    async def live() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/orders", status_code=201)
    async def naive_order(body: OrderCreate, conn: WriteConnection) -> dict[str, int]:
        product = await conn.fetchrow(
            "SELECT price, stock FROM products WHERE id = $1", body.product_id
        )
        if product is None:
            raise Problem(404, "not_found", "no such product")
        if product["stock"] < body.quantity:
            raise Problem(409, "insufficient_stock", "Not enough stock.")
        await asyncio.sleep(0.001)  # any await between the read and the write opens the race
        await conn.execute(
            "UPDATE products SET stock = $2 WHERE id = $1",
            body.product_id,
            product["stock"] - body.quantity,
        )
        total = product["price"] * body.quantity
        await conn.execute(
            "UPDATE accounts SET balance = balance - $2 WHERE user_id = $1", body.user_id, total
        )
        order_id = await conn.fetchval(
            """
            INSERT INTO orders (user_id, product_id, quantity, unit_price, total)
            VALUES ($1, $2, $3, $4, $5) RETURNING id
            """,
            body.user_id,
            body.product_id,
            body.quantity,
            product["price"],
            total,
        )
        return {"id": int(order_id)}

    return app
