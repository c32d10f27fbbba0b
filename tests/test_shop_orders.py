"""Orders, accounts, transfers and the dashboard: contract behaviour and invariants."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pglayer_shop.app import create_app
from pglayer_shop.settings import ShopSettings

from pglayer import Database
from tests.conftest import asgi_client
from tests.test_shop_users import assert_problem, create_user


async def make_product(client: httpx.AsyncClient, price: str = "12.50", stock: int = 10) -> int:
    response = await client.post(
        "/products", json={"name": "Widget", "price": price, "stock": stock}
    )
    assert response.status_code == 201, response.text
    assert response.headers["location"] == f"/products/{response.json()['id']}"
    return int(response.json()["id"])


async def funded_user(client: httpx.AsyncClient, email: str, amount: str = "100.00") -> int:
    user = await create_user(client, "Buyer", email)
    if Decimal(amount) > 0:
        response = await client.post(f"/accounts/{user['id']}/deposits", json={"amount": amount})
        assert response.status_code == 200, response.text
    return int(user["id"])


async def balance(client: httpx.AsyncClient, user_id: int) -> Decimal:
    return Decimal((await client.get(f"/accounts/{user_id}")).json()["balance"])


async def stock(client: httpx.AsyncClient, product_id: int) -> int:
    return int((await client.get(f"/products/{product_id}")).json()["stock"])


async def test_an_order_moves_stock_money_and_writes_the_row(client: httpx.AsyncClient) -> None:
    user = await funded_user(client, "a@example.com", "100.00")
    product = await make_product(client, "12.50", 10)
    response = await client.post(
        "/orders", json={"user_id": user, "product_id": product, "quantity": 3}
    )
    assert response.status_code == 201, response.text
    order = response.json()
    assert response.headers["location"] == f"/orders/{order['id']}"
    assert (order["unit_price"], order["total"], order["quantity"]) == ("12.50", "37.50", 3)
    assert await stock(client, product) == 7
    assert await balance(client, user) == Decimal("62.50")
    assert (await client.get(f"/orders/{order['id']}")).json() == order


@pytest.mark.parametrize(
    ("quantity", "deposit", "code"),
    [(11, "1000.00", "insufficient_stock"), (2, "20.00", "insufficient_funds")],
)
async def test_a_refused_order_changes_nothing(
    client: httpx.AsyncClient, quantity: int, deposit: str, code: str
) -> None:
    user = await funded_user(client, "a@example.com", deposit)
    product = await make_product(client, "12.50", 10)
    response = await client.post(
        "/orders", json={"user_id": user, "product_id": product, "quantity": quantity}
    )
    assert_problem(response, 409, code)
    assert await stock(client, product) == 10
    assert await balance(client, user) == Decimal(deposit)
    listing = (await client.get(f"/users/{user}/orders")).json()
    assert listing == {"items": [], "next_cursor": None}


async def test_unknown_user_or_product_is_404(client: httpx.AsyncClient) -> None:
    user = await funded_user(client, "a@example.com")
    product = await make_product(client)
    for body in (
        {"user_id": 2**62, "product_id": product, "quantity": 1},
        {"user_id": user, "product_id": 2**62, "quantity": 1},
    ):
        assert_problem(await client.post("/orders", json=body), 404, "not_found")
    assert await stock(client, product) == 10


@pytest.mark.parametrize(
    "body",
    [
        {"user_id": 1, "product_id": 1, "quantity": 0},
        {"user_id": 1, "product_id": 1, "quantity": 1001},
        {"user_id": 1.0, "product_id": 1, "quantity": 1},
        {"user_id": "1", "product_id": 1, "quantity": 1},
        {"user_id": 0, "product_id": 1, "quantity": 1},
        {"user_id": 2**63, "product_id": 1, "quantity": 1},
        {"user_id": 1, "product_id": 1, "quantity": True},
    ],
)
async def test_invalid_orders_are_422(client: httpx.AsyncClient, body: dict[str, Any]) -> None:
    assert_problem(await client.post("/orders", json=body), 422, "validation_error")


@pytest.mark.parametrize("amount", ["0", "-5.00", "1.005", 12.5, "abc", "1000000.01", True, None])
async def test_invalid_money_is_422(client: httpx.AsyncClient, amount: Any) -> None:
    user = await funded_user(client, "a@example.com", "0")
    response = await client.post(f"/accounts/{user}/deposits", json={"amount": amount})
    assert_problem(response, 422, "validation_error")
    assert await balance(client, user) == Decimal("0.00")


async def test_deposit_to_unknown_account_is_404(client: httpx.AsyncClient) -> None:
    response = await client.post("/accounts/999999/deposits", json={"amount": "1.00"})
    assert_problem(response, 404, "not_found")


async def test_a_deposit_resent_with_its_key_is_made_once(client: httpx.AsyncClient) -> None:
    # A deposit can answer 500 `commit_unknown`, whose detail says to resend with the key.
    user = await funded_user(client, "a@example.com", "0")
    headers = {"Idempotency-Key": "dep-1"}
    path = f"/accounts/{user}/deposits"
    first = await client.post(path, json={"amount": "5.00"}, headers=headers)
    again = await client.post(path, json={"amount": "5.00"}, headers=headers)
    other = await client.post(path, json={"amount": "6.00"}, headers=headers)
    assert (first.status_code, again.status_code) == (200, 200)
    assert again.content == first.content
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert_problem(other, 422, "idempotency_key_reused")
    assert await balance(client, user) == Decimal("5.00")


async def test_a_deposits_key_is_not_spent_on_an_unknown_account(
    client: httpx.AsyncClient,
) -> None:
    user = await funded_user(client, "a@example.com", "0")
    headers = {"Idempotency-Key": "dep-2"}
    missing = await client.post(
        "/accounts/999999/deposits", json={"amount": "1.00"}, headers=headers
    )
    assert_problem(missing, 404, "not_found")
    # The key names the account with the body: the same key for another account is another
    # request, and the 404 stored nothing under it.
    found = await client.post(
        f"/accounts/{user}/deposits", json={"amount": "1.00"}, headers=headers
    )
    assert found.status_code == 200, found.text
    again = await client.post("/accounts/999999/deposits", json={"amount": "1.00"}, headers=headers)
    assert_problem(again, 422, "idempotency_key_reused")


async def test_idempotency_key_replays_the_same_order(client: httpx.AsyncClient) -> None:
    user = await funded_user(client, "a@example.com")
    product = await make_product(client)
    body = {"user_id": user, "product_id": product, "quantity": 1}
    headers = {"Idempotency-Key": "key-1"}
    first = await client.post("/orders", json=body, headers=headers)
    again = await client.post("/orders", json=body, headers=headers)
    assert first.status_code == again.status_code == 201
    assert "idempotent-replayed" not in first.headers
    assert again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content  # the same text, keys in the same order
    other = await client.post("/orders", json={**body, "quantity": 2}, headers=headers)
    assert_problem(other, 422, "idempotency_key_reused")
    assert await stock(client, product) == 9


async def test_a_key_resent_with_a_space_after_it_is_the_same_key(
    client: httpx.AsyncClient,
) -> None:
    # RFC 9110: the whitespace around a field's value is not part of it. A proxy that adds
    # one (or a client) made another key: a second order.
    user = await funded_user(client, "a@example.com")
    product = await make_product(client)
    body = {"user_id": user, "product_id": product, "quantity": 1}
    first = await client.post("/orders", json=body, headers={"Idempotency-Key": "key-2"})
    again = await client.post("/orders", json=body, headers={"Idempotency-Key": "key-2 \t"})
    assert again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content
    assert await stock(client, product) == 9


async def test_a_failed_order_does_not_consume_its_key(client: httpx.AsyncClient) -> None:
    user = await funded_user(client, "a@example.com", "0")
    product = await make_product(client)
    body = {"user_id": user, "product_id": product, "quantity": 1}
    headers = {"Idempotency-Key": "retry-me"}
    assert_problem(
        await client.post("/orders", json=body, headers=headers), 409, "insufficient_funds"
    )
    await client.post(f"/accounts/{user}/deposits", json={"amount": "50"})
    assert (await client.post("/orders", json=body, headers=headers)).status_code == 201


@pytest.mark.parametrize(
    ("key", "said"),
    [  # of "items" they were, the bounds set on the optional rather than its string
        ("", "String should have at least 1 character"),
        ("k" * 201, "String should have at most 200 characters"),
    ],
)
async def test_bad_idempotency_keys_are_422(client: httpx.AsyncClient, key: str, said: str) -> None:
    response = await client.post(
        "/orders",
        json={"user_id": 1, "product_id": 1, "quantity": 1},
        headers={"Idempotency-Key": key},
    )
    assert_problem(response, 422, "validation_error")
    [error] = [e for e in response.json()["errors"] if e["loc"] == ["header", "Idempotency-Key"]]
    assert error["msg"] == said


async def test_the_idempotency_keys_bounds_are_in_the_openapi_schema(
    client: httpx.AsyncClient,
) -> None:
    operation = (await client.get("/openapi.json")).json()["paths"]["/orders"]["post"]
    [header] = [p for p in operation["parameters"] if p["name"] == "Idempotency-Key"]
    key = header["schema"]["anyOf"][0]
    assert (key["minLength"], key["maxLength"]) == (1, 200)
    assert key["pattern"] == "^[\\x20-\\x7E]{1,200}$"


async def test_fifty_concurrent_requests_with_one_key_make_one_order(
    client: httpx.AsyncClient, db: Database
) -> None:
    user = await funded_user(client, "a@example.com")
    product = await make_product(client)
    body = {"user_id": user, "product_id": product, "quantity": 1}
    responses = await asyncio.gather(
        *(client.post("/orders", json=body, headers={"Idempotency-Key": "same"}) for _ in range(50))
    )
    assert {r.status_code for r in responses} == {201}
    assert len({r.json()["id"] for r in responses}) == 1
    assert sum(r.headers.get("idempotent-replayed") == "true" for r in responses) == 49
    async with db.connection() as conn:
        assert await conn.fetchval("SELECT count(*) FROM orders") == 1
    assert await stock(client, product) == 9


async def test_user_orders_are_paged_newest_first(client: httpx.AsyncClient) -> None:
    user = await funded_user(client, "a@example.com", "1000.00")
    product = await make_product(client, "1.00", 100)
    ids = []
    for _ in range(5):
        r = await client.post(
            "/orders", json={"user_id": user, "product_id": product, "quantity": 1}
        )
        ids.append(r.json()["id"])
    seen: list[int] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2} | ({"after": cursor} if cursor else {})
        page = (await client.get(f"/users/{user}/orders", params=params)).json()
        seen += [o["id"] for o in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))
    assert_problem(await client.get("/users/999999/orders"), 404, "not_found")


async def test_a_cursor_of_one_list_is_422_on_another(client: httpx.AsyncClient) -> None:
    users = [await funded_user(client, f"{n}@example.com", "1000.00") for n in "abc"]
    product = await make_product(client, "1.00", 100)
    await make_product(client, "1.00", 100)
    await make_product(client, "1.00", 100)
    for user in users[:2]:
        for _ in range(3):
            body = {"user_id": user, "product_id": product, "quantity": 1}
            assert (await client.post("/orders", json=body)).status_code == 201
    pages = {
        route: (await client.get(route, params={"limit": 2})).json()["next_cursor"]
        for route in ("/users", "/products", f"/users/{users[0]}/orders")
    }
    assert all(pages.values())
    for route, cursor in pages.items():
        assert (await client.get(route, params={"limit": 2, "after": cursor})).status_code == 200
    for route, other in [
        ("/products", pages["/users"]),
        ("/users", pages["/products"]),
        ("/users", pages[f"/users/{users[0]}/orders"]),
        (f"/users/{users[1]}/orders", pages[f"/users/{users[0]}/orders"]),
    ]:
        response = await client.get(route, params={"limit": 2, "after": other})
        problem = assert_problem(response, 422, "validation_error")
        assert problem["errors"][0]["loc"] == ["query", "after"], route


async def test_a_transfer_sent_again_with_its_key_is_made_once(client: httpx.AsyncClient) -> None:
    a = await funded_user(client, "a@example.com", "50.00")
    b = await funded_user(client, "b@example.com", "0")
    body = {"from_user_id": a, "to_user_id": b, "amount": "20.50"}
    key = {"Idempotency-Key": "transfer-1"}
    first = await client.post("/transfers", json=body, headers=key)
    again = await client.post("/transfers", json=body, headers=key)
    assert (first.status_code, again.status_code) == (201, 201)
    assert again.json() == first.json()
    assert again.headers["location"] == first.headers["location"]
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert (await balance(client, a), await balance(client, b)) == (
        Decimal("29.50"),
        Decimal("20.50"),
    )
    other = await client.post("/transfers", json={**body, "amount": "1.00"}, headers=key)
    reused = assert_problem(other, 422, "idempotency_key_reused")
    assert reused["errors"][0]["loc"] == ["header", "Idempotency-Key"]
    assert await balance(client, a) == Decimal("29.50")


async def test_transfers_move_money_and_refuse_overdrafts(client: httpx.AsyncClient) -> None:
    a = await funded_user(client, "a@example.com", "50.00")
    b = await funded_user(client, "b@example.com", "0")
    response = await client.post(
        "/transfers", json={"from_user_id": a, "to_user_id": b, "amount": "20.5"}
    )
    assert response.status_code == 201, response.text
    transfer = response.json()
    assert transfer["amount"] == "20.50"
    assert (await client.get(response.headers["location"])).json() == transfer
    assert (await balance(client, a), await balance(client, b)) == (
        Decimal("29.50"),
        Decimal("20.50"),
    )
    over = await client.post(
        "/transfers", json={"from_user_id": b, "to_user_id": a, "amount": "20.51"}
    )
    assert_problem(over, 409, "insufficient_funds")
    same = await client.post("/transfers", json={"from_user_id": a, "to_user_id": a, "amount": "1"})
    refused = assert_problem(same, 422, "validation_error")
    assert refused["errors"][0]["loc"] == ["body", "to_user_id"]
    missing = await client.post(
        "/transfers", json={"from_user_id": a, "to_user_id": 999999, "amount": "1"}
    )
    assert_problem(missing, 404, "not_found")
    assert (await balance(client, a), await balance(client, b)) == (
        Decimal("29.50"),
        Decimal("20.50"),
    )


@pytest.mark.parametrize("strategy", ["single", "concurrent"])
async def test_dashboard_strategies_agree(db: Database, strategy: str) -> None:
    app: FastAPI = create_app(db=db, settings=ShopSettings(dashboard_strategy=strategy))
    async with app.router.lifespan_context(app), asgi_client(app) as client:
        user = await funded_user(client, "a@example.com", "500.00")
        product = await make_product(client, "3.10", 100)
        for q in (1, 2, 3):
            await client.post(
                "/orders", json={"user_id": user, "product_id": product, "quantity": q}
            )
        async with db.connection() as conn:  # an order older than 30 days is left out
            await conn.execute(
                "INSERT INTO orders (user_id, product_id, quantity, unit_price, total, created_at)"
                " VALUES ($1, $2, 1, 3.10, 3.10, now() - interval '31 days')",
                user,
                product,
            )
        body = (await client.get(f"/dashboard/{user}")).json()
        assert body["user"]["id"] == user
        assert body["balance"] == "481.40"
        assert [o["quantity"] for o in body["recent_orders"]] == [3, 2, 1]
        assert body["recent_orders"][0]["total"] == "9.30"
        assert_problem(await client.get("/dashboard/999999"), 404, "not_found")
