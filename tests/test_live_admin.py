"""The live pool page over ASGI: who gets in (404 / 401 / cookie / bearer), the session
cookie's attributes and signature, the JSON it polls, and the bounded slow-statement ring.

The page in a real browser: tests/test_live_page.py.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pglayer_shop.app import create_app
from pglayer_shop.settings import ShopSettings

from pglayer import Database, InvalidInputError, SlowQuery
from pglayer._observability import (
    MAX_RECENT_STATEMENT,
    RECENT_SLOW_QUERIES,
    Observer,
    StatsRecorder,
)
from pglayer.fastapi import admin_router, setup
from pglayer.fastapi._live import (
    CONTENT_SECURITY_POLICY,
    MAX_NAMED_COUNTERS,
    SESSION_COOKIE,
    fingerprint,
    live_snapshot,
    session_key,
    session_value,
)
from tests.conftest import asgi_client, settings_for
from tests.test_shop_users import assert_problem

TOKEN = "live-page-token"
KEY = session_key(TOKEN.encode())
BROWSER = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
STATIC = Path(__file__).parent.parent / "src" / "pglayer" / "fastapi" / "_static"


def page_app(db: Database, token: str | None, **kwargs: Any) -> FastAPI:
    app = FastAPI()
    setup(app, db)
    app.include_router(admin_router(token=token, **kwargs))
    return app


@pytest.fixture
async def live(db: Database) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(page_app(db, TOKEN)) as client:
        yield client


def cookie_header(value: str) -> dict[str, str]:
    return {"Cookie": f"{SESSION_COOKIE}={value}"}


def valid_cookie() -> dict[str, str]:
    return cookie_header(session_value(KEY, int(time.time()) + 600))


async def open_session(client: httpx.AsyncClient, token: str = TOKEN) -> httpx.Response:
    return await client.post(
        "/admin/session",
        content=f"token={token}",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )


# -- 404 / 401 -------------------------------------------------------------------------------

ROUTES = [
    ("GET", "/admin/pool"),
    ("GET", "/admin/pool.json"),
    ("POST", "/admin/session"),
    ("GET", "/admin/pool/static/pool.js"),
]


@pytest.mark.parametrize(("method", "path"), ROUTES)
async def test_without_a_configured_token_the_page_does_not_exist(
    db: Database, method: str, path: str
) -> None:
    async with asgi_client(page_app(db, None)) as client:
        response = await client.request(method, path, headers={"Authorization": "Bearer x"})
    assert_problem(response, 404, "not_found")


async def test_the_page_without_credentials_is_a_401_token_form(
    live: httpx.AsyncClient,
) -> None:
    response = await live.get("/admin/pool", headers=BROWSER)
    assert response.status_code == 401
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert '<form id="login" method="post" action="session"' in response.text
    assert 'data-chart="conns"' not in response.text  # no dashboard
    assert TOKEN not in response.text


async def test_the_page_without_credentials_is_a_401_problem_for_other_clients(
    live: httpx.AsyncClient,
) -> None:
    problem = assert_problem(await live.get("/admin/pool"), 401, "unauthorized")
    refusing = {"Accept": "application/json, text/html;q=0"}
    assert_problem(await live.get("/admin/pool", headers=refusing), 401, "unauthorized")
    assert "token" in problem["detail"]
    wrong = await live.post(
        "/admin/session", content="token=wrong",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )  # fmt: skip
    assert assert_problem(wrong, 401, "unauthorized")["detail"] == "That is not the admin token."


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": TOKEN},
        {"Authorization": f"Basic {TOKEN}"},
        cookie_header("v1.9999999999.00"),
        {"Cookie": f"other={session_value(KEY, int(time.time()) + 600)}"},
    ],
)
async def test_the_data_without_credentials_is_a_401(
    live: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    response = await live.get("/admin/pool.json", headers=headers)
    assert_problem(response, 401, "unauthorized")
    assert response.headers["www-authenticate"].startswith("Bearer")


async def test_the_bearer_token_opens_page_and_data(live: httpx.AsyncClient) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert (await live.get("/admin/pool.json", headers=auth)).status_code == 200
    assert (await live.get("/admin/pool", headers=auth)).status_code == 200


# -- the session cookie ------------------------------------------------------------------------


def set_cookie(response: httpx.Response) -> tuple[str, dict[str, str]]:
    """The session cookie's value and attributes (lower-cased names; flags map to "")."""
    [header] = response.headers.get_list("set-cookie")
    name_value, *attributes = (part.strip() for part in header.split(";"))
    name, _, value = name_value.partition("=")
    assert name == SESSION_COOKIE
    attrs = {}
    for attribute in attributes:
        key, _, val = attribute.partition("=")
        attrs[key.lower()] = val
    return value, attrs


async def test_the_form_exchanges_the_token_for_a_short_lived_strict_cookie(
    live: httpx.AsyncClient,
) -> None:
    before = int(time.time())
    response = await open_session(live)
    assert response.status_code == 303
    assert response.headers["location"] == "pool"
    assert response.headers["cache-control"] == "no-store"
    value, attrs = set_cookie(response)
    assert attrs == {"httponly": "", "max-age": "900", "path": "/admin", "samesite": "strict"}
    assert TOKEN not in value
    match = re.fullmatch(r"v1\.([0-9]+)\.[0-9a-f]{64}", value)
    assert match is not None
    assert before + 900 <= int(match[1]) <= int(time.time()) + 900
    # The cookie alone opens the page and its data.
    page = await live.get("/admin/pool", headers=cookie_header(value))
    assert page.status_code == 200
    assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert page.headers["cache-control"] == "no-store"
    data = await live.get("/admin/pool.json", headers=cookie_header(value))
    assert data.status_code == 200
    assert data.headers["cache-control"] == "no-store"


async def test_the_cookie_follows_prefix_and_lifetime_and_https(db: Database) -> None:
    app = page_app(db, TOKEN, prefix="/ops", session_ttl=60)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="https://shop.test") as client:
        response = await client.post(
            "/ops/session",
            data={"token": TOKEN},
        )
    assert response.status_code == 303
    _, attrs = set_cookie(response)
    assert attrs == {
        "httponly": "",
        "max-age": "60",
        "path": "/ops",
        "samesite": "strict",
        "secure": "",
    }


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        ("token=wrong", "application/x-www-form-urlencoded"),
        ("token=", "application/x-www-form-urlencoded"),
        ("", "application/x-www-form-urlencoded"),
        (f'{{"token": "{TOKEN}"}}', "application/json"),
        (f"token={TOKEN}&" + "x=1&" * 10, "application/x-www-form-urlencoded"),
        (f"token={TOKEN}&pad=" + "x" * 5000, "application/x-www-form-urlencoded"),
    ],
)
async def test_a_wrong_or_malformed_form_gets_no_cookie(
    live: httpx.AsyncClient, body: str, content_type: str
) -> None:
    response = await live.post(
        "/admin/session", content=body, headers={"Content-Type": content_type, **BROWSER}
    )
    assert response.status_code == 401
    assert "set-cookie" not in response.headers
    assert "That is not the admin token." in response.text
    assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY


def forged_cookies() -> dict[str, str]:
    now = int(time.time())
    good = session_value(KEY, now + 600)
    return {
        "expired": session_value(KEY, now - 1),
        "signed by another token": session_value(session_key(b"another token"), now + 600),
        "expiry changed": good.replace(f"v1.{now + 600}.", f"v1.{now + 6000}."),
        "signature changed": good[:-1] + ("0" if good[-1] != "0" else "1"),
        "valid far longer than a session": session_value(KEY, now + 86_400),
        "the token itself": TOKEN,
        "no signature": f"v1.{now + 600}",
        "another version": "v2" + good[2:],
        "too long": good + "0" * 1000,
    }


@pytest.mark.parametrize("name", sorted(forged_cookies()))
async def test_a_forged_or_expired_cookie_is_refused(live: httpx.AsyncClient, name: str) -> None:
    headers = cookie_header(forged_cookies()[name])
    assert_problem(await live.get("/admin/pool.json", headers=headers), 401, "unauthorized")
    assert (await live.get("/admin/pool", headers=headers)).status_code == 401


async def test_changing_the_token_ends_every_session(db: Database) -> None:
    async with asgi_client(page_app(db, "a-new-token")) as client:
        response = await client.get("/admin/pool.json", headers=valid_cookie())
    assert_problem(response, 401, "unauthorized")


async def test_session_accepts_only_post(live: httpx.AsyncClient) -> None:
    response = await live.get("/admin/session")
    assert_problem(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "POST"


# -- the page and its files ---------------------------------------------------------------------


async def test_the_page_loads_only_files_of_its_origin(live: httpx.AsyncClient) -> None:
    page = (await live.get("/admin/pool", headers=valid_cookie())).text
    login = (await live.get("/admin/pool")).text
    for html in (page, login):
        assert not re.search(r"<script(?![^>]*\bsrc=)", html), "inline script"
        assert not re.search(r"\son[a-z]+=", html), "inline event handler"
        assert not re.search(r"\sstyle=|<style", html), "inline style"
        assert "//" not in re.sub(r"<!--.*?-->", "", html).replace("http://", "")
    assets = re.findall(r'(?:src|href)="(pool/static/[^"]+)"', page)
    types = {"js": "text/javascript; charset=utf-8", "css": "text/css; charset=utf-8",
             "svg": "image/svg+xml"}  # fmt: skip
    assert len(assets) == 5
    for asset in assets:
        response = await live.get(f"/admin/{asset}")
        assert response.status_code == 200, asset
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["content-type"] == types[asset.split("?")[0].rsplit(".")[-1]]


@pytest.mark.parametrize("name", ["nope.js", "..%2Fpool.html", "pool.html", "_live.py"])
async def test_only_the_page_files_are_served(live: httpx.AsyncClient, name: str) -> None:
    response = await live.get(f"/admin/pool/static/{name}")
    assert response.status_code == 404


def test_the_vendored_chart_library_is_the_noted_version() -> None:
    notes = (STATIC / "uplot" / "README.md").read_text()
    assert "version **1.6.32**" in notes
    assert "licence **MIT**" in notes
    assert "MIT License" in (STATIC / "uplot" / "LICENSE").read_text()
    for name in ("uPlot.iife.min.js", "uPlot.min.css"):
        digest = hashlib.sha256((STATIC / "uplot" / name).read_bytes()).hexdigest()
        assert f"`{name}` — sha256 `{digest}`" in notes
    assert (
        (STATIC / "uplot" / "uPlot.iife.min.js")
        .read_text()
        .startswith("/*! https://github.com/leeoniya/uPlot (v1.6.32) */")
    )


# -- the data ----------------------------------------------------------------------------------

POOL_KEYS = {
    "name", "open", "min_size", "max_size", "size", "idle", "in_use", "waiting",
    "acquisitions", "acquire_timeouts", "requests_shed", "acquire_wait", "bulkheads", "errors",
    "retries", "give_ups", "connections", "slow_queries", "replica", "recent_slow",
}  # fmt: skip


async def test_the_data_has_every_pool_and_what_the_page_shows(db_url: str) -> None:
    secret = "parameter-value-never-shown"
    async with Database(settings_for(db_url, slow_query_threshold=0.000001)) as db:
        await db.run(lambda c: c.fetchval("SELECT pg_sleep(0.01), $1::text", secret))
        with pytest.raises(InvalidInputError):
            await db.run(lambda c: c.fetchval("SELECT 1 / 0"))
        async with asgi_client(page_app(db, TOKEN)) as client:
            response = await client.get("/admin/pool.json", headers=valid_cookie())
    assert response.headers["content-type"] == "application/json"
    data = response.json()
    assert secret not in response.text
    assert abs(data["time"] - time.time()) < 5
    assert data["worker"] == os.getpid()  # each worker answers for its own pools
    [pool] = data["pools"]
    assert set(pool) == POOL_KEYS
    assert pool["name"] == "primary"
    assert pool["replica"] is None
    assert pool["acquisitions"] >= 2
    wait = pool["acquire_wait"]
    assert set(wait) == {"bounds", "counts", "count", "sum_seconds", "p50", "p99"}
    assert len(wait["counts"]) == len(wait["bounds"]) + 1
    assert sum(wait["counts"]) == wait["count"] == pool["acquisitions"]
    assert set(pool["connections"]) == {"opened", "closed", "lost", "failed"}
    assert set(pool["bulkheads"]) >= {"write"}
    assert set(pool["bulkheads"]["write"]) == {
        "cap", "in_use", "waiting", "refused", "acquire_timeouts",
    }  # fmt: skip
    assert sum(pool["errors"].values()) >= 1
    newest, older = pool["recent_slow"][0], pool["recent_slow"][1]
    assert newest["statement"] == fingerprint("SELECT 1 / 0")  # the text is only logged
    assert newest["error"] is not None
    assert older["statement"] == fingerprint("SELECT pg_sleep(0.01), $1::text")
    assert older["statement"].startswith("SELECT #")
    assert older["seconds"] >= 0.01
    assert older["operation"] == "-"
    assert older["request_id"] == "-"
    assert older["at"] <= newest["at"]


def test_each_replica_is_a_pool_with_its_rotation_state(db_url: str) -> None:
    db = Database(settings_for(db_url, replica_urls=[db_url]))  # not opened: health unknown
    data = live_snapshot(db)
    assert [p["name"] for p in data["pools"]] == ["primary", "replica-1"]
    primary, replica = data["pools"]
    assert primary["replica"] is None
    assert replica["replica"] == {"healthy": False, "reason": "unknown", "lag_seconds": None}
    assert (replica["open"], replica["size"]) == (False, 0)


async def test_the_data_is_bounded_however_many_names(
    db: Database, live: httpx.AsyncClient
) -> None:
    for i in range(100):
        db._stats.error(f"Error{i:03d}")
        db._stats.retried(f"reason{i:03d}")
    pool = (await live.get("/admin/pool.json", headers=valid_cookie())).json()["pools"][0]
    assert len(pool["errors"]) == len(pool["retries"]) == MAX_NAMED_COUNTERS
    assert sum(pool["errors"].values()) == 100
    assert pool["errors"]["other"] == 100 - (MAX_NAMED_COUNTERS - 1)


async def test_the_slow_statements_carry_their_request_id_and_operation(
    db_url: str,
) -> None:
    async with Database(settings_for(db_url, slow_query_threshold=0.001)) as db:
        app = page_app(db, TOKEN)

        @app.get("/slow")
        async def slow() -> dict[str, str]:
            await db.run(lambda c: c.execute("SELECT pg_sleep(0.005)"))
            return {}

        async with asgi_client(app) as client:
            await client.get("/slow", headers={"X-Request-ID": "req-42"})
            data = (await client.get("/admin/pool.json", headers=valid_cookie())).json()
    slept = fingerprint("SELECT pg_sleep(0.005)")
    [query] = [q for q in data["pools"][0]["recent_slow"] if q["statement"] == slept]
    assert query["request_id"] == "req-42"
    assert query["operation"] == "/slow"


# -- the ring ----------------------------------------------------------------------------------


def test_the_slow_ring_keeps_only_the_latest_and_clips_the_text() -> None:
    stats = StatsRecorder()
    observer = Observer("primary", stats, slow_query_threshold=0.1)
    for i in range(RECENT_SLOW_QUERIES + 15):
        observer.query_finished(f"SELECT {i}  \n  FROM t", 0.2 + i / 1000)
    observer.query_finished("SELECT fast", 0.05)  # under the threshold: not kept
    observer.query_finished("SELECT '" + "x" * 5000 + "'", 0.3)
    kept = list(stats.recent_slow)
    assert len(kept) == RECENT_SLOW_QUERIES
    assert stats.slow_queries == RECENT_SLOW_QUERIES + 16
    assert kept[0].statement == "SELECT 16 FROM t"  # whitespace folded, oldest dropped
    assert kept[-1].statement.endswith("…")
    assert len(kept[-1].statement) == MAX_RECENT_STATEMENT + 1
    assert all(isinstance(q, SlowQuery) and q.pool == "primary" for q in kept)


async def test_recent_slow_queries_are_newest_first(db_url: str) -> None:
    async with Database(settings_for(db_url, slow_query_threshold=0.000001)) as db:
        for i in range(RECENT_SLOW_QUERIES + 5):
            statement = f"SELECT {i}"
            await db.run(lambda c: c.fetchval(statement))  # noqa: B023  (awaited at once)
        recent = db.recent_slow_queries()
    assert len(recent) == RECENT_SLOW_QUERIES
    assert [q.statement for q in recent[:2]] == [
        f"SELECT {RECENT_SLOW_QUERIES + 4}",
        f"SELECT {RECENT_SLOW_QUERIES + 3}",
    ]


# -- in the shop ---------------------------------------------------------------------------------


async def test_the_shop_serves_the_page_with_its_admin_token(db: Database) -> None:
    app = create_app(db=db, settings=ShopSettings(admin_token=TOKEN))
    async with app.router.lifespan_context(app), asgi_client(app) as client:
        refused = await client.get("/admin/pool.json")
        session = await open_session(client)
        value, _ = set_cookie(session)
        data = await client.get("/admin/pool.json", headers=cookie_header(value))
        stats = await client.get("/admin/db-stats", headers={"Authorization": f"Bearer {TOKEN}"})
    assert refused.status_code == 401
    assert data.status_code == 200
    assert data.json()["pools"][0]["name"] == "primary"
    assert stats.status_code == 200
    assert set(stats.json()["pools"]) == {"primary"}
