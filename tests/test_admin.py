"""`/admin/db-stats`: protected by a bearer token; counters move exactly as scripted."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import httpx
import orjson
import pytest
from pglayer_shop.app import create_app
from pglayer_shop.settings import ShopSettings

from pglayer import ConfigurationError, Database
from pglayer.fastapi import admin_router
from tests.conftest import asgi_client
from tests.test_shop_users import assert_problem

TOKEN = "s3cret-admin-token"


@pytest.fixture
async def admin_client(db: Database) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(db=db, settings=ShopSettings(admin_token=TOKEN))
    async with app.router.lifespan_context(app), asgi_client(app) as client:
        yield client


async def test_no_configured_token_hides_the_route(client: httpx.AsyncClient) -> None:
    response = await client.get("/admin/db-stats", headers={"Authorization": f"Bearer {TOKEN}"})
    assert_problem(response, 404, "not_found")


async def test_stats_name_the_worker_that_answers(admin_client: httpx.AsyncClient) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    stats = (await admin_client.get("/admin/db-stats", headers=auth)).json()
    assert stats["worker"] == os.getpid()  # its own pools; /metrics adds up every worker


async def test_what_the_admin_routes_answer_is_never_cached(
    admin_client: httpx.AsyncClient,
) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for path in ("/admin/db-stats", "/admin/users/export"):
        response = await admin_client.get(path, headers=auth)
        assert response.status_code == 200
        assert response.headers["cache-control"] == "no-store", path
    for path in ("/admin/db-stats", "/admin/users/export", "/admin/pool.json"):
        refused = await admin_client.get(path)  # no token: the 401 is not cached either
        assert refused.status_code == 401
        assert refused.headers["cache-control"] == "no-store", path


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": "Basic x"}],
)
async def test_missing_or_wrong_tokens_are_401(
    admin_client: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    response = await admin_client.get("/admin/db-stats", headers=headers)
    assert_problem(response, 401, "unauthorized")
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert TOKEN not in response.text


@pytest.mark.parametrize("order", ["right first", "wrong first"])
async def test_two_authorization_headers_are_401(
    admin_client: httpx.AsyncClient, order: str
) -> None:
    tokens = [f"Bearer {TOKEN}", "Bearer wrong"]
    headers = [("Authorization", t) for t in (tokens if order == "right first" else tokens[::-1])]
    response = await admin_client.get("/admin/db-stats", headers=headers)
    assert_problem(response, 401, "unauthorized")


async def test_stats_count_exactly_what_happened(
    admin_client: httpx.AsyncClient, db: Database
) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    before = (await admin_client.get("/admin/db-stats", headers=auth)).json()["pools"]["primary"]
    for i in range(5):
        await admin_client.get(f"/users/{i + 1}")
    after = (await admin_client.get("/admin/db-stats", headers=auth)).json()["pools"]["primary"]
    assert after["acquisitions"] - before["acquisitions"] == 5
    assert after["acquire_wait"]["count"] - before["acquire_wait"]["count"] == 5
    assert after["hold_time"]["count"] - before["hold_time"]["count"] == 5
    assert after["in_use"] == 0
    assert after["waiting"] == 0
    assert (after["min_size"], after["max_size"]) == (db.settings.min_size, db.settings.max_size)
    assert after["idle"] == after["size"] >= 1
    assert set(after["acquire_wait"]) == {"count", "sum_seconds", "p50", "p95", "p99", "buckets"}
    assert after["acquire_wait"]["buckets"]["+Inf"] == after["acquire_wait"]["count"]


async def test_the_user_export_streams_every_user_as_ndjson(
    admin_client: httpx.AsyncClient, db: Database
) -> None:
    for i in range(3):
        await admin_client.post("/users", json={"name": f"U{i}", "email": f"u{i}@example.com"})
    response = await admin_client.get(
        "/admin/users/export", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/x-ndjson"
    users = [orjson.loads(line) for line in response.content.splitlines()]
    assert [u["email"] for u in users] == [f"u{i}@example.com" for i in range(3)]
    assert set(users[0]) == {"id", "name", "email", "created_at"}
    # Times as every other route writes them (`GET /users/{id}`): UTC with "Z".
    one = (await admin_client.get(f"/users/{users[0]['id']}")).json()
    assert users[0]["created_at"] == one["created_at"]
    assert users[0]["created_at"].endswith("Z")
    assert db.stats().in_use == 0


@pytest.mark.parametrize(("token", "status"), [(None, 404), ("wrong", 401)])
async def test_the_user_export_needs_the_token(
    db: Database, token: str | None, status: int
) -> None:
    app = create_app(db=db, settings=ShopSettings(admin_token=None if status == 404 else TOKEN))
    async with app.router.lifespan_context(app), asgi_client(app) as client:
        response = await client.get(
            "/admin/users/export", headers={"Authorization": f"Bearer {token or TOKEN}"}
        )
    assert_problem(response, status, "not_found" if status == 404 else "unauthorized")


def test_an_admin_token_with_spaces_at_its_ends_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="spaces at its ends"):
        admin_router(token="   ")


@pytest.mark.parametrize(
    "token", ["tökén-ñ-0123456789abcdefghijkl", "0123456789abcdef€", "a b" * 9]
)
def test_an_admin_token_a_header_cannot_carry_as_is_is_refused(token: str) -> None:
    # Header values are read as Latin-1: a UTF-8 client never matched, so the bearer-only
    # routes were closed to every usual client, unannounced.
    with pytest.raises(ConfigurationError, match="printable ASCII"):
        admin_router(token=token)


def test_a_short_admin_token_is_warned_of(caplog: pytest.LogCaptureFixture) -> None:
    admin_router(token="short-token")
    (warned,) = [r for r in caplog.records if "short enough to guess" in r.getMessage()]
    assert "short-token" not in warned.getMessage()
    caplog.clear()
    admin_router(token="a-long-random-token-0123456789abcdef")
    assert not caplog.records
