"""The naive baseline: the common tutorial pattern, kept as it is usually written.

FastAPI + an asyncpg pool created at startup, `Model(**row)` responses serialised by
FastAPI's default path, an `asyncio.gather` dashboard on three connections, no deadlines,
no bound on waiting, read-modify-write orders.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from decimal import Decimal

import asyncpg
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

pool: asyncpg.Pool | None = None


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    global pool
    pool = await asyncpg.create_pool(os.environ["DATABASE_URL"], min_size=10, max_size=10)
    yield
    await pool.close()


app = FastAPI(lifespan=lifespan)


class User(BaseModel):
    id: int
    name: str
    email: str
    created_at: datetime


class Order(BaseModel):
    id: int
    user_id: int
    product_id: int
    quantity: int
    unit_price: Decimal
    total: Decimal
    created_at: datetime


class Dashboard(BaseModel):
    user: User
    recent_orders: list[Order]
    balance: Decimal


class OrderIn(BaseModel):
    user_id: int
    product_id: int
    quantity: int


@app.get("/users/{user_id}", response_model=User)
async def get_user(user_id: int) -> User:
    assert pool is not None
    async with pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT id, name, email, created_at FROM users WHERE id = $1", user_id
        )
    if row is None:
        raise HTTPException(404, "not found")
    return User(**row)


@app.get("/dashboard/{user_id}", response_model=Dashboard)
async def dashboard(user_id: int) -> Dashboard:
    assert pool is not None

    async def one(sql: str) -> list[asyncpg.Record]:
        assert pool is not None
        async with pool.acquire() as conn:
            return await conn.fetch(sql, user_id)

    users, orders, accounts = await asyncio.gather(
        one("SELECT id, name, email, created_at FROM users WHERE id = $1"),
        one(
            "SELECT id, user_id, product_id, quantity, unit_price, total, created_at FROM orders"
            " WHERE user_id = $1 AND created_at > now() - interval '30 days'"
            " ORDER BY created_at DESC LIMIT 20"
        ),
        one("SELECT balance FROM accounts WHERE user_id = $1"),
    )
    if not users:
        raise HTTPException(404, "not found")
    return Dashboard(
        user=User(**users[0]),
        recent_orders=[Order(**r) for r in orders],
        balance=accounts[0]["balance"],
    )


@app.post("/orders", response_model=Order, status_code=201)
async def create_order(body: OrderIn) -> Order:
    assert pool is not None
    async with pool.acquire() as conn, conn.transaction():
        product = await conn.fetchrow(
            "SELECT price, stock FROM products WHERE id = $1", body.product_id
        )
        if product is None or product["stock"] < body.quantity:
            raise HTTPException(409, "insufficient stock")
        total = product["price"] * body.quantity
        balance = await conn.fetchval(
            "SELECT balance FROM accounts WHERE user_id = $1", body.user_id
        )
        if balance is None or balance < total:
            raise HTTPException(409, "insufficient funds")
        await conn.execute(
            "UPDATE products SET stock = stock - $1 WHERE id = $2", body.quantity, body.product_id
        )
        await conn.execute(
            "UPDATE accounts SET balance = balance - $1 WHERE user_id = $2", total, body.user_id
        )
        row = await conn.fetchrow(
            "INSERT INTO orders (user_id, product_id, quantity, unit_price, total)"
            " VALUES ($1, $2, $3, $4, $5)"
            " RETURNING id, user_id, product_id, quantity, unit_price, total, created_at",
            body.user_id,
            body.product_id,
            body.quantity,
            product["price"],
            total,
        )
    return Order(**row)
