"""The shop's users, accounts and health routes, as CONTRACT.md states them."""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import pytest
from pglayer_shop.app import create_app
from pglayer_shop.schema import shop_migrations
from pglayer_shop.settings import ShopSettings
from pydantic import TypeAdapter

from pglayer import Database
from pglayer.fastapi import Cursors
from pglayer.migrations import migrate
from tests.conftest import Server, asgi_client, free_port, refuses_to_start, settings_for

PROBLEM_KEYS = {"type", "title", "status", "detail", "code"}


def assert_problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body.keys() >= PROBLEM_KEYS
    assert body["status"] == status
    assert body["code"] == code
    return body


async def create_user(client: httpx.AsyncClient, name: str, email: str) -> dict[str, Any]:
    response = await client.post("/users", json={"name": name, "email": email})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


@pytest.mark.parametrize("path", ["/users", "/products"])
async def test_an_invalid_body_is_refused_before_a_connection_is_taken(
    client: httpx.AsyncClient, db: Database, path: str
) -> None:
    before = db.stats().acquisitions
    for body in ({"name": ""}, {"name": "n", "email": "x", "price": "1", "stock": -1}):
        assert_problem(await client.post(path, json=body), 422, "validation_error")
    assert db.stats().acquisitions == before


async def test_create_user_returns_201_location_and_opens_an_account(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post("/users", json={"name": "Ada", "email": "ada@example.com"})
    assert response.status_code == 201
    user = response.json()
    assert set(user) == {"id", "name", "email", "created_at"}
    assert response.headers["location"] == f"/users/{user['id']}"
    assert (await client.get(f"/users/{user['id']}")).json() == user
    account = await client.get(f"/accounts/{user['id']}")
    assert account.status_code == 200
    assert account.json() == {"user_id": user["id"], "balance": "0.00"}


async def test_taken_email_is_a_409_case_insensitively(client: httpx.AsyncClient) -> None:
    await create_user(client, "Ada", "Ada@Example.com")
    response = await client.post("/users", json={"name": "Other", "email": "ada@example.COM"})
    assert_problem(response, 409, "conflict")
    users = (await client.get("/users")).json()["items"]
    assert [u["email"] for u in users] == ["Ada@Example.com"]


async def test_unicode_round_trips_exactly(client: httpx.AsyncClient) -> None:
    name = "Zoë 🦊 e\u0301 \u202e naïve 名前"
    user = await create_user(client, name, "zoë@exämple.com")
    fetched = (await client.get(f"/users/{user['id']}")).json()
    assert fetched["name"] == name
    assert fetched["email"] == "zoë@exämple.com"


@pytest.mark.parametrize(
    "body",
    [
        {"name": "", "email": "a@example.com"},
        {"name": "x" * 201, "email": "a@example.com"},
        {"name": "nul\x00byte", "email": "a@example.com"},
        {"name": "Ada", "email": "not-an-email"},
        {"name": "Ada", "email": "a" * 250 + "@example.com"},
        {"name": "Ada", "email": "a\x00@example.com"},
        {"name": 5, "email": "a@example.com"},
        {"name": "Ada"},
        {"name": "Ada", "email": "a@example.com", "admin": True},
        [],
    ],
)
async def test_invalid_user_bodies_are_422_with_fields(
    client: httpx.AsyncClient, body: Any
) -> None:
    response = await client.post("/users", json=body)
    problem = assert_problem(response, 422, "validation_error")
    assert problem["errors"], problem


async def test_a_body_that_is_not_json_is_422(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/users", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_problem(response, 422, "validation_error")


async def test_a_body_over_one_mib_is_413(client: httpx.AsyncClient) -> None:
    big = {"name": "x", "email": "a@example.com", "pad": "y" * (1 << 20)}
    response = await client.post("/users", json=big)
    assert_problem(response, 413, "payload_too_large")


@pytest.mark.parametrize("bad_id", ["0", "-1", str(2**63), "1e3", "abc", "1.5"])
@pytest.mark.parametrize("route", ["/users/{}", "/accounts/{}"])
async def test_ids_outside_positive_int64_are_422(
    client: httpx.AsyncClient, route: str, bad_id: str
) -> None:
    response = await client.get(route.format(bad_id))
    assert_problem(response, 422, "validation_error")


@pytest.mark.parametrize("route", ["/users/{}", "/accounts/{}"])
async def test_unknown_ids_are_404(client: httpx.AsyncClient, route: str) -> None:
    response = await client.get(route.format(2**63 - 1))
    assert_problem(response, 404, "not_found")


async def test_list_users_walks_every_page_once_in_id_order(client: httpx.AsyncClient) -> None:
    created = [await create_user(client, f"U{i}", f"u{i}@example.com") for i in range(7)]
    seen: list[int] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 3}
        if cursor:
            params["after"] = cursor
        page = (await client.get("/users", params=params)).json()
        seen.extend(u["id"] for u in page["items"])
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [u["id"] for u in created]
    assert pages == 3


async def test_a_full_last_page_has_no_next_cursor(client: httpx.AsyncClient) -> None:
    for i in range(2):
        await create_user(client, f"U{i}", f"u{i}@example.com")
    page = (await client.get("/users", params={"limit": 2})).json()
    assert len(page["items"]) == 2
    assert page["next_cursor"] is None


@pytest.mark.parametrize(
    "params",
    [{"limit": 0}, {"limit": 101}, {"limit": "x"}, {"after": "garbage!"}, {"after": "WyJ4Il0"}],
)
async def test_bad_paging_parameters_are_422(
    client: httpx.AsyncClient, params: dict[str, Any]
) -> None:
    response = await client.get("/users", params=params)
    assert_problem(response, 422, "validation_error")


async def test_health_live_and_ready(client: httpx.AsyncClient) -> None:
    assert (await client.get("/health/live")).status_code == 200
    ready = await client.get("/health/ready")
    assert ready.status_code == 200
    assert ready.json()["pools"] == {"primary": "ok"}


async def test_with_the_database_down_ready_is_503_and_requests_get_503_with_retry_after() -> None:
    url = f"postgresql://app:secretpw@127.0.0.1:{free_port()}/shop"
    db = Database(settings_for(url, require_on_startup=False, connect_timeout=0.2))
    app = create_app(db=db, settings=ShopSettings())
    async with app.router.lifespan_context(app), asgi_client(app) as client:
        assert (await client.get("/health/live")).status_code == 200
        ready = await client.get("/health/ready")
        assert_problem(ready, 503, "unavailable")
        assert ready.headers["retry-after"].isdigit()
        response = await client.get("/users/1")
        assert_problem(response, 503, "unavailable")
        assert response.headers["retry-after"].isdigit()
        assert "secretpw" not in response.text
        assert "asyncpg" not in response.text


async def test_openapi_declares_problem_responses_for_every_route(
    client: httpx.AsyncClient,
) -> None:
    spec = (await client.get("/openapi.json")).json()
    assert "ProblemDetails" in spec["components"]["schemas"]
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            if path in ("/health/live", "/metrics"):  # no database behind them
                continue
            responses = operation["responses"]
            for status in ("500", "503"):
                assert status in responses, (method, path)
                assert "application/problem+json" in responses[status]["content"], (method, path)
    assert "409" in spec["paths"]["/users"]["post"]["responses"]
    assert "404" in spec["paths"]["/users/{user_id}"]["get"]["responses"]


@pytest.mark.parametrize(("method", "path"), [("GET", "/users/1/"), ("POST", "/users/"),
                                              ("DELETE", "/users/1/")])  # fmt: skip
async def test_a_trailing_slash_is_not_redirected(
    client: httpx.AsyncClient, method: str, path: str
) -> None:
    response = await client.request(method, path, headers={"Host": "evil.example"})
    assert_problem(response, 404, "not_found")
    assert "location" not in response.headers


async def test_a_money_bound_is_written_as_the_number_not_a_python_repr(
    client: httpx.AsyncClient,
) -> None:
    body = {"name": "Widget", "price": "99999999999.00", "stock": 1}
    problem = assert_problem(await client.post("/products", json=body), 422, "validation_error")
    [error] = problem["errors"]
    assert error["loc"] == ["body", "price"]
    assert error["msg"] == "Input should be less than or equal to 9999999999.99"


async def test_workers_share_a_random_cursor_secret_kept_in_the_database(
    db: Database, db_url: str
) -> None:
    apps = [create_app(db=db, settings=ShopSettings()) for _ in range(2)]  # two workers
    for n in range(3):
        async with asgi_client(apps[0]) as first:
            await create_user(first, "U", f"u{n}@example.com")
    async with asgi_client(apps[0]) as first, asgi_client(apps[1]) as second:
        cursor = (await first.get("/users", params={"limit": 1})).json()["next_cursor"]
        page = await second.get("/users", params={"limit": 1, "after": cursor})
        assert page.status_code == 200, page.text
        guessed = Cursors(db_url).encode(1, of="users")  # the URL is no longer the key
        refused = await second.get("/users", params={"limit": 1, "after": guessed})
        assert_problem(refused, 422, "validation_error")
    async with db.connection() as conn:
        rows = await conn.fetch("SELECT name, octet_length(value) AS size FROM pglayer_secrets")
    assert [(r["name"], r["size"]) for r in rows] == [("cursors", 32)]


@pytest.mark.parametrize("refusal", ["closed to connections", "renamed"])
async def test_a_database_that_refuses_new_connections_is_503_not_500(
    server: Server, admin: asyncpg.Connection[Any], db_name: str, refusal: str
) -> None:
    db = Database(settings_for(server.url_for(db_name), min_size=0))
    app = create_app(db=db, settings=ShopSettings())
    async with app.router.lifespan_context(app), asgi_client(app) as client:
        assert (await client.get("/users/1")).status_code == 404  # reachable
        moved = f"{db_name}_moved"
        terminate = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1"
        if refusal == "closed to connections":
            await admin.execute(f'ALTER DATABASE "{db_name}" ALLOW_CONNECTIONS false')
        await admin.execute(terminate, db_name)  # the pool's one connection (min_size 0)
        count = "SELECT count(*) FROM pg_stat_activity WHERE datname = $1"
        for _ in range(100):  # a terminated backend takes a moment to go
            if not await admin.fetchval(count, db_name):
                break
            await asyncio.sleep(0.05)
        if refusal == "renamed":
            await admin.execute(f'ALTER DATABASE "{db_name}" RENAME TO "{moved}"')
        try:
            response = await client.get("/users/1")
            assert_problem(response, 503, "unavailable")
            assert response.headers["retry-after"]
        finally:
            if refusal == "renamed":
                await admin.execute(f'ALTER DATABASE "{moved}" RENAME TO "{db_name}"')
            else:
                await admin.execute(f'ALTER DATABASE "{db_name}" ALLOW_CONNECTIONS true')


async def test_a_cursor_takes_the_uuid_and_decimal_keys_a_row_holds(db: Database) -> None:
    # asyncpg's UUID and Decimal were "not JSON serializable": a 500 for a list by UUID.
    async with db.connection() as conn:
        row = await conn.fetchrow("SELECT gen_random_uuid() AS id, 12.50::numeric AS price")
    assert row is not None
    cursors = Cursors("secret")
    cursor = cursors.encode(row["price"], row["id"], of="items")
    key = cursors.decode(cursor, TypeAdapter(tuple[Decimal, uuid.UUID]), of="items")
    assert key == (Decimal("12.50"), uuid.UUID(str(row["id"])))


async def test_the_shop_refuses_to_start_on_a_database_without_its_tables(
    server: Server, admin: asyncpg.Connection[Any]
) -> None:
    # Served by `pglayer serve` without its migrations: ready 200, and every route a 500.
    name = f"t_empty_{uuid.uuid4().hex[:8]}"
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        db = Database(settings_for(server.url_for(name)))
        app = create_app(db=db, settings=ShopSettings(admin_token=None))
        await refuses_to_start(app, "pglayer-shop migrate")
    finally:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


async def test_the_shop_refuses_to_start_on_a_schema_older_than_its_code(
    server: Server, admin: asyncpg.Connection[Any]
) -> None:
    # An upgrade served before `migrate` ran: the new code on the old functions.
    name = f"t_old_{uuid.uuid4().hex[:8]}"
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        db = Database(settings_for(server.url_for(name)))
        async with db:
            await migrate(db, shop_migrations()[:-1], pglayer_tables=True)
        app = create_app(db=db, settings=ShopSettings(admin_token=None))
        await refuses_to_start(app, shop_migrations()[-1].name)
    finally:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
