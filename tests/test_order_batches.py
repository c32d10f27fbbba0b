"""Keyless orders of one product placed together: one call and one commit for many."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from pglayer_shop.app import create_app
from pglayer_shop.orders import OrderBatches
from pglayer_shop.settings import ShopSettings

from pglayer import Database
from tests.conftest import asgi_client, wait_for
from tests.test_shop_orders import balance, funded_user, make_product


@pytest.fixture
async def shop(db: Database) -> AsyncIterator[FastAPI]:
    app = create_app(db=db, settings=ShopSettings(admin_token=None, write_lock_timeout=10))
    async with app.router.lifespan_context(app):
        yield app


async def _held_up(
    app: FastAPI, db_url: str, product: int, bodies: list[dict[str, Any]]
) -> list[httpx.Response]:
    """Send `bodies` while another connection holds the product's row: the first order's
    call waits on it, the others wait for that call; then let the row go."""
    batches: OrderBatches = app.state.order_batches
    async with _row_held(db_url, product) as holder, asgi_client(app) as client:
        first = asyncio.create_task(client.post("/orders", json=bodies[0]))
        assert await wait_for(lambda: _locked(holder))
        rest = [asyncio.create_task(client.post("/orders", json=b)) for b in bodies[1:]]
        assert await wait_for(lambda: _async(batches.waiting == len(rest)))
        await holder.execute("ROLLBACK")
        return [await first, *[await task for task in rest]]


@asynccontextmanager
async def _row_held(db_url: str, product: int) -> AsyncIterator[asyncpg.Connection[Any]]:
    """Another connection that holds `product`'s row locked (until it rolls back)."""
    holder = await asyncpg.connect(db_url)
    try:
        await holder.execute(f"BEGIN; SELECT 1 FROM products WHERE id = {product} FOR UPDATE")
        yield holder
    finally:
        await holder.close()


async def _product_and_buyer(app: FastAPI) -> tuple[int, int]:
    """A product (100 in stock at 1.00) and a user with 100.00 to spend."""
    async with asgi_client(app) as client:
        product = await make_product(client, price="1.00", stock=100)
        return product, await funded_user(client, "buyer@example.com", "100.00")


async def _locked(holder: asyncpg.Connection[Any]) -> bool:
    # Inside the holder's transaction, PostgreSQL 15 would answer from its first snapshot.
    await holder.execute("SELECT pg_stat_clear_snapshot()")
    waiting = await holder.fetchval(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    return bool(waiting)


async def _async(value: bool) -> bool:
    return value


async def _transactions(conn: asyncpg.Connection[Any], product: int) -> int:
    """How many transactions wrote the product's orders (rows of one share their xmin)."""
    return int(
        await conn.fetchval(
            "SELECT count(DISTINCT xmin::text) FROM orders WHERE product_id = $1", product
        )
    )


async def test_orders_that_wait_behind_a_call_are_placed_together(
    shop: FastAPI, db_url: str
) -> None:
    async with asgi_client(shop) as client:
        product = await make_product(client, price="2.00", stock=100)
        users = [await funded_user(client, f"b{i}@example.com", "10.00") for i in range(8)]
    bodies = [{"user_id": u, "product_id": product, "quantity": 1} for u in users]

    responses = await _held_up(shop, db_url, product, bodies)

    assert [r.status_code for r in responses] == [201] * 8
    assert len({r.json()["id"] for r in responses}) == 8
    assert [r.json()["user_id"] for r in responses] == users
    conn = await asyncpg.connect(db_url)
    try:
        assert await _transactions(conn, product) == 2  # the first alone, then the seven
        assert await conn.fetchval("SELECT stock FROM products WHERE id = $1", product) == 92
    finally:
        await conn.close()
    async with asgi_client(shop) as client:
        assert [await balance(client, u) for u in users] == [Decimal("8.00")] * 8
    batches: OrderBatches = shop.state.order_batches
    assert (batches.calls, batches.orders) == (2, 8)


async def test_each_order_of_a_batch_gets_its_own_answer(shop: FastAPI, db_url: str) -> None:
    async with asgi_client(shop) as client:
        product = await make_product(client, price="5.00", stock=10)
        rich = await funded_user(client, "rich@example.com", "100.00")
        poor = await funded_user(client, "poor@example.com", "4.00")
    order = {"product_id": product, "quantity": 1}
    bodies = [
        {**order, "user_id": rich},
        {**order, "user_id": poor},  # 409 insufficient_funds
        {**order, "user_id": 999_999},  # 404: no such user
        {**order, "user_id": rich, "quantity": 10},  # 409 insufficient_stock: 9 left
        {**order, "user_id": rich, "quantity": 8},
        {"product_id": 999_999, "user_id": rich, "quantity": 1},  # another product: alone
    ]

    responses = await _held_up(shop, db_url, product, bodies[:5])
    async with asgi_client(shop) as client:
        other = await client.post("/orders", json=bodies[5])

    assert [r.status_code for r in [*responses, other]] == [201, 409, 404, 409, 201, 404]
    assert [r.json().get("code") for r in responses[1:4]] == [
        "insufficient_funds",
        "not_found",
        "insufficient_stock",
    ]
    async with asgi_client(shop) as client:
        assert await balance(client, rich) == Decimal("55.00")
        assert await balance(client, poor) == Decimal("4.00")
        assert (await client.get(f"/products/{product}")).json()["stock"] == 1


async def test_an_order_the_database_refuses_inside_a_batch_is_refused_alone(
    shop: FastAPI, db_url: str
) -> None:
    product, user = await _product_and_buyer(shop)
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute("ALTER TABLE orders ADD CONSTRAINT no_sevens CHECK (quantity <> 7)")
        bodies = [{"user_id": user, "product_id": product, "quantity": q} for q in (1, 2, 7, 3)]

        responses = await _held_up(shop, db_url, product, bodies)

        assert [r.status_code for r in responses] == [201, 201, 422, 201]
        assert await conn.fetchval("SELECT stock FROM products WHERE id = $1", product) == 94
    finally:
        await conn.close()


async def test_an_order_whose_client_left_before_its_call_is_not_placed(
    shop: FastAPI, db_url: str
) -> None:
    product, user = await _product_and_buyer(shop)
    body = {"user_id": user, "product_id": product, "quantity": 1}
    batches: OrderBatches = shop.state.order_batches
    async with _row_held(db_url, product) as holder:
        async with asgi_client(shop) as client:
            first = asyncio.create_task(client.post("/orders", json=body))
            assert await wait_for(lambda: _locked(holder))
            left = asyncio.create_task(client.post("/orders", json={**body, "quantity": 5}))
            stays = asyncio.create_task(client.post("/orders", json={**body, "quantity": 2}))
            assert await wait_for(lambda: _async(batches.waiting == 2))
            left.cancel()
            await asyncio.gather(left, return_exceptions=True)
            await holder.execute("ROLLBACK")
            assert [(await first).status_code, (await stays).status_code] == [201, 201]
        assert await holder.fetchval("SELECT stock FROM products WHERE id = $1", product) == 97
    assert (batches.calls, batches.orders) == (2, 2)


async def test_a_call_whose_clients_all_left_is_cancelled_and_places_nothing(
    shop: FastAPI, db_url: str
) -> None:
    # Placed 13 s after its client left (499), or after a stopping server told it 503
    # "send the request again": a second order when the client did.
    product, user = await _product_and_buyer(shop)
    body = {"user_id": user, "product_id": product, "quantity": 1}
    batches: OrderBatches = shop.state.order_batches
    async with _row_held(db_url, product) as holder:
        async with asgi_client(shop) as client:
            alone = asyncio.create_task(client.post("/orders", json=body))
            assert await wait_for(lambda: _locked(holder))
            pair = [asyncio.create_task(client.post("/orders", json=body)) for _ in range(2)]
            assert await wait_for(lambda: _async(batches.waiting == 2))
            alone.cancel()  # its call carries it alone: cancelled; the pair's call begins
            assert await wait_for(lambda: _async(batches.waiting == 0 and batches.calls == 2))
            assert await wait_for(lambda: _locked(holder))
            pair[0].cancel()
            await asyncio.sleep(0.1)
            assert batches._calls  # the other order it carries still waits for it
            pair[1].cancel()
            assert await wait_for(lambda: _async(not batches._calls))
            await asyncio.gather(alone, *pair, return_exceptions=True)
            assert await wait_for(lambda: _async_not(_locked(holder)))  # cancelled on the server
            await holder.execute("ROLLBACK")
        placed = await holder.fetchval("SELECT count(*) FROM orders WHERE product_id = $1", product)
    assert placed == 0
    assert (batches.calls, batches.orders) == (2, 3)


async def _async_not(value: Awaitable[bool]) -> bool:
    return not await value


async def test_with_a_batch_size_of_one_every_order_is_its_own_call(
    db: Database, db_url: str
) -> None:
    settings = ShopSettings(admin_token=None, write_lock_timeout=10, order_batch_size=1)
    app = create_app(db=db, settings=settings)
    async with app.router.lifespan_context(app), asgi_client(app) as client:
        product = await make_product(client, price="1.00", stock=100)
        user = await funded_user(client, "e@example.com", "100.00")
        body = {"user_id": user, "product_id": product, "quantity": 1}
        responses = await asyncio.gather(*(client.post("/orders", json=body) for _ in range(6)))
    assert [r.status_code for r in responses] == [201] * 6
    conn = await asyncpg.connect(db_url)
    try:
        assert await _transactions(conn, product) == 6
    finally:
        await conn.close()


async def test_a_batch_whose_connection_is_lost_places_none_and_tells_each_order(
    shop: FastAPI, db_url: str, admin: asyncpg.Connection[Any], db_name: str
) -> None:
    product, first_buyer = await _product_and_buyer(shop)
    async with asgi_client(shop) as client:
        buyer = await funded_user(client, "batch@example.com", "100.00")
    batches: OrderBatches = shop.state.order_batches
    row_holder, account_holder = await asyncpg.connect(db_url), await asyncpg.connect(db_url)
    try:
        # The batch's buyer's account is held from the start, so the batch, once the first
        # order's call has the product's row and commits, waits on it: PostgreSQL does not
        # queue a row's lockers fairly, so a second holder of the product's row could lose
        # the race to the batch.
        await account_holder.execute(
            f"BEGIN; SELECT 1 FROM accounts WHERE user_id = {buyer} FOR UPDATE"
        )
        await row_holder.execute(f"BEGIN; SELECT 1 FROM products WHERE id = {product} FOR UPDATE")
        first_body = {"user_id": first_buyer, "product_id": product, "quantity": 1}
        body = {"user_id": buyer, "product_id": product, "quantity": 1}
        async with asgi_client(shop) as client:
            first = asyncio.create_task(client.post("/orders", json=first_body))
            assert await wait_for(lambda: _lock_waits(admin, db_name, 1))
            rest = [asyncio.create_task(client.post("/orders", json=body)) for _ in range(3)]
            assert await wait_for(lambda: _async(batches.waiting == 3))
            await row_holder.execute("ROLLBACK")
            assert (await first).status_code == 201
            batch = await wait_for(lambda: _batch_backend(admin, db_name))
            assert batch
            await admin.execute("SELECT pg_terminate_backend($1)", batch)
            answers = [await task for task in rest]
        await account_holder.execute("ROLLBACK")
        assert [(r.status_code, r.json()["code"]) for r in answers] == [(500, "commit_unknown")] * 3
        assert await row_holder.fetchval("SELECT stock FROM products WHERE id = $1", product) == 99
        assert (
            await row_holder.fetchval("SELECT count(*) FROM orders WHERE product_id = $1", product)
            == 1
        )
    finally:
        await row_holder.close()
        await account_holder.close()


async def _lock_waits(admin: asyncpg.Connection[Any], db_name: str, n: int) -> bool:
    waiting = await admin.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND wait_event_type = 'Lock'",
        db_name,
    )
    return bool(waiting >= n)


async def _batch_backend(admin: asyncpg.Connection[Any], db_name: str) -> int | None:
    pid = await admin.fetchval(
        "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND wait_event_type = 'Lock'"
        " AND query LIKE '%shop_place_orders%'",
        db_name,
    )
    return None if pid is None else int(pid)
