"""Invariants under concurrency, through real HTTP to a separate uvicorn process.

The oversell checker is also run against a naive read-modify-write implementation
(tests/naive_shop.py), where it must find violations: proof that it can fail.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import pytest

from tests.conftest import ServerProcess, server_env

pytestmark = pytest.mark.slow

CLIENTS = 1_000
STOCK = 100
BUYERS = 10
PRICE = Decimal("2.50")
START_BALANCE = Decimal("1000.00")


async def prepare(db_url: str) -> int:
    conn: asyncpg.Connection[Any] = await asyncpg.connect(db_url)
    try:
        await conn.execute(
            """
            INSERT INTO users (id, name, email)
                SELECT g, 'Buyer ' || g, 'buyer' || g || '@example.com'
                FROM generate_series(1, $1) g;
            INSERT INTO accounts (user_id, balance) SELECT id, $2 FROM users;
            SELECT setval(pg_get_serial_sequence('users', 'id'), $1);
            """.replace("$1", str(BUYERS)).replace("$2", str(START_BALANCE))
        )
        return int(
            await conn.fetchval(
                "INSERT INTO products (name, price, stock) VALUES ('Scarce', $1, $2) RETURNING id",
                PRICE,
                STOCK,
            )
        )
    finally:
        await conn.close()


async def storm(url: str, product_id: int) -> list[tuple[int, int, str | None]]:
    """CLIENTS concurrent orders of quantity 1; returns (user, status, code) per request."""
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:

        async def one(i: int) -> tuple[int, int, str | None]:
            user = 1 + i % BUYERS
            r = await client.post(
                "/orders", json={"user_id": user, "product_id": product_id, "quantity": 1}
            )
            code = r.json().get("code") if r.status_code >= 400 else None
            return user, r.status_code, code

        return await asyncio.gather(*(one(i) for i in range(CLIENTS)))


async def oversell_violations(
    db_url: str, product_id: int, results: list[tuple[int, int, str | None]]
) -> list[str]:
    """Every way the outcome can break the contract's invariants, in words."""
    problems: list[str] = []
    statuses = Counter((s, c) for _, s, c in results)
    if statuses[(201, None)] != STOCK:
        problems.append(f"{statuses[(201, None)]} orders accepted, expected {STOCK}")
    if statuses[(409, "insufficient_stock")] != CLIENTS - STOCK:
        problems.append(f"statuses {dict(statuses)}")
    conn: asyncpg.Connection[Any] = await asyncpg.connect(db_url)
    try:
        final_stock = await conn.fetchval("SELECT stock FROM products WHERE id = $1", product_id)
        orders = await conn.fetchval(
            "SELECT count(*) FROM orders WHERE product_id = $1", product_id
        )
        sold = await conn.fetchval(
            "SELECT coalesce(sum(quantity), 0) FROM orders WHERE product_id = $1", product_id
        )
        balances = {r["user_id"]: r["balance"] for r in await conn.fetch("SELECT * FROM accounts")}
    finally:
        await conn.close()
    if final_stock != 0:
        problems.append(f"final stock {final_stock}, expected 0")
    if orders != STOCK:
        problems.append(f"{orders} order rows, expected {STOCK}")
    if STOCK - final_stock != sold:
        problems.append(f"stock fell by {STOCK - final_stock} but orders sum to {sold}")
    accepted = Counter(user for user, s, _ in results if s == 201)
    for user, money in balances.items():
        expected = START_BALANCE - PRICE * accepted[user]
        if money != expected:
            problems.append(f"user {user} balance {money}, expected {expected}")
    return problems


async def test_a_thousand_concurrent_orders_never_oversell(db_url: str) -> None:
    product = await prepare(db_url)
    env = server_env(db_url, PGLAYER_MAX_WAITERS="5000", PGLAYER_ACQUIRE_TIMEOUT="60")
    async with ServerProcess("pglayer_shop.app:create_app", env) as server:
        results = await storm(server.url, product)
    assert await oversell_violations(db_url, product, results) == []


async def test_the_oversell_checker_catches_a_naive_read_modify_write(db_url: str) -> None:
    product = await prepare(db_url)
    env = server_env(db_url, PGLAYER_MAX_WAITERS="5000", PGLAYER_ACQUIRE_TIMEOUT="60")
    async with ServerProcess("tests.naive_shop:create_app", env) as server:
        results = await storm(server.url, product)
    violations = await oversell_violations(db_url, product, results)
    print("\nnaive read-modify-write:", "; ".join(violations[:4]))
    assert violations, "the checker passed a read-modify-write implementation"


async def test_money_is_conserved_under_mixed_concurrent_traffic(db_url: str) -> None:
    product = await prepare(db_url)
    setup: asyncpg.Connection[Any] = await asyncpg.connect(db_url)
    try:
        await setup.execute("UPDATE products SET stock = 1000000 WHERE id = $1", product)
    finally:
        await setup.close()
    rng = random.Random(7)
    env = server_env(db_url, PGLAYER_MAX_WAITERS="5000", PGLAYER_ACQUIRE_TIMEOUT="60")
    async with ServerProcess("pglayer_shop.app:create_app", env) as server:
        limits = httpx.Limits(max_connections=600, max_keepalive_connections=600)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=120) as client:
            requests: list[tuple[str, str, dict[str, Any]]] = []
            for _ in range(200):
                requests.append(("order", "/orders", {
                    "user_id": rng.randint(1, BUYERS), "product_id": product,
                    "quantity": rng.randint(1, 3)}))  # fmt: skip
            for _ in range(100):
                user = rng.randint(1, BUYERS)
                amount = f"{rng.randint(1, 5000) / 100:.2f}"
                requests.append(("deposit", f"/accounts/{user}/deposits", {"amount": amount}))
            for _ in range(150):  # crossing pairs: A→B and B→A at once
                a, b = rng.sample(range(1, BUYERS + 1), 2)
                amount = f"{rng.randint(1, 30000) / 100:.2f}"
                requests.append(
                    (
                        "transfer",
                        "/transfers",
                        {"from_user_id": a, "to_user_id": b, "amount": amount},
                    )
                )
                requests.append(
                    (
                        "transfer",
                        "/transfers",
                        {"from_user_id": b, "to_user_id": a, "amount": amount},
                    )
                )
            rng.shuffle(requests)

            async def send(kind: str, path: str, body: dict[str, Any]) -> tuple[str, int, Any]:
                r = await client.post(path, json=body)
                return kind, r.status_code, r.json()

            results = await asyncio.gather(*(send(*req) for req in requests))

    statuses = Counter((kind, status) for kind, status, _ in results)
    assert all(status < 500 for _, status in statuses), statuses
    assert {status for _, status in statuses} <= {200, 201, 409}, statuses
    # gather keeps order: results[i] answers requests[i].
    deposited = sum(
        (
            Decimal(req[2]["amount"])
            for req, (kind, status, _) in zip(requests, results, strict=True)
            if kind == "deposit" and status == 200
        ),
        Decimal(0),
    )
    spent = sum(
        (Decimal(b["total"]) for k, s, b in results if k == "order" and s == 201), Decimal(0)
    )
    conn: asyncpg.Connection[Any] = await asyncpg.connect(db_url)
    try:
        total = await conn.fetchval("SELECT sum(balance) FROM accounts")
        negative = await conn.fetchval("SELECT count(*) FROM accounts WHERE balance < 0")
        db_deposits = await conn.fetchval("SELECT coalesce(sum(amount), 0) FROM deposits")
        db_spent = await conn.fetchval("SELECT coalesce(sum(total), 0) FROM orders")
    finally:
        await conn.close()
    assert negative == 0
    assert db_deposits == deposited
    assert db_spent == spent
    assert total == START_BALANCE * BUYERS + deposited - spent
    assert statuses[("transfer", 201)] > 0
    assert statuses[("order", 201)] > 0
