"""Transaction dependencies: commit before the response, rollback on any error, always release."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Annotated, Any

import asyncpg
import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI, HTTPException
from fastapi.routing import APIRoute
from pglayer_shop.app import create_app
from pglayer_shop.settings import ShopSettings
from pydantic import BaseModel
from starlette.types import Message, Receive, Scope, Send

from pglayer import Connection, Database, deadline, gather
from pglayer._context import FRONT_DOOR_KEY
from pglayer._http import PROTOCOL
from pglayer.fastapi import (
    Route,
    WriteConnection,
    WriteTransaction,
    setup,
    transaction_dependency,
    transactional,
)
from pglayer.fastapi._middleware import WATCH_AFTER
from tests.conftest import LiveServer, asgi_client, backends, settings_for, wait_for


def build_app(db: Database) -> FastAPI:
    app = FastAPI()
    setup(app, db)

    @app.post("/items/{k}")
    async def insert(k: int, conn: WriteTransaction) -> dict[str, int]:
        await conn.execute("INSERT INTO items (k) VALUES ($1)", k)
        return {"k": k}

    @app.post("/deferred")
    async def deferred(conn: WriteTransaction) -> dict[str, bool]:
        # Both rows go in; the deferred unique constraint only fails at COMMIT.
        await conn.execute("INSERT INTO deferred_items (k) VALUES (1), (1)")
        return {"ok": True}

    @app.post("/items/{k}/then-http-error")
    async def then_http_error(k: int, conn: WriteTransaction) -> None:
        await conn.execute("INSERT INTO items (k) VALUES ($1)", k)
        raise HTTPException(400, "rejected after the write")

    @app.post("/items/{k}/then-crash")
    async def then_crash(k: int, conn: WriteTransaction) -> None:
        await conn.execute("INSERT INTO items (k) VALUES ($1)", k)
        raise RuntimeError("secret internals: SELECT password FROM vault")

    @app.post("/items/{k}/own-commit")
    async def own_commit(k: int, conn: WriteTransaction) -> dict[str, int]:
        await conn.execute("INSERT INTO items (k) VALUES ($1)", k)
        await conn.execute("COMMIT")
        return {"k": k}

    @app.post("/items/{k}/own-begin")
    async def own_begin(k: int, conn: WriteConnection) -> dict[str, int]:
        await conn.execute("BEGIN")
        await conn.execute("INSERT INTO items (k) VALUES ($1)", k)
        return {"k": k}

    @app.post("/sleep")
    async def sleep(conn: WriteTransaction) -> None:
        await conn.execute("INSERT INTO items (k) VALUES (99)")
        await conn.execute("SELECT pg_sleep(30)", timeout=60)

    @app.get("/sleep-autocommit")
    async def sleep_autocommit(conn: WriteConnection) -> None:
        await conn.execute("SELECT pg_sleep(30)", timeout=60)

    return app


@pytest.fixture
async def tx_db(db_url: str) -> AsyncIterator[Database]:
    async with Database(settings_for(db_url, max_size=2)) as db:
        async with db.connection() as conn:
            await conn.execute(
                """
                CREATE TABLE items (k int PRIMARY KEY);
                CREATE TABLE deferred_items (
                    k int CONSTRAINT deferred_items_k_key UNIQUE DEFERRABLE INITIALLY DEFERRED
                );
                """
            )
        yield db


async def count(admin: asyncpg.Connection[Any], db_url: str, table: str) -> int:
    conn: asyncpg.Connection[Any] = await asyncpg.connect(db_url)
    try:
        return int(await conn.fetchval(f"SELECT count(*) FROM {table}"))
    finally:
        await conn.close()


async def no_leaks(admin: asyncpg.Connection[Any], db_name: str, db: Database) -> bool:
    """Nothing running or idle in a transaction, and the pool has every connection back."""
    rows = await backends(admin, db_name)
    busy = [r for r in rows if r["state"] != "idle"]
    return not busy and db.stats().in_use == 0


async def test_commit_happens_before_the_first_byte_of_the_response(
    tx_db: Database, db_url: str, admin: asyncpg.Connection[Any]
) -> None:
    app = build_app(tx_db)
    seen_at_response_start: list[int] = []

    async def observing(scope: Scope, receive: Receive, send: Send) -> None:
        async def send_and_look(message: Message) -> None:
            if message["type"] == "http.response.start":
                seen_at_response_start.append(await count(admin, db_url, "items"))
            await send(message)

        await app(scope, receive, send_and_look)

    transport = httpx.ASGITransport(app=observing)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://t") as client,
    ):
        response = await client.post("/items/7")
    assert response.status_code == 200
    assert seen_at_response_start == [1]


async def test_a_commit_that_fails_is_an_error_response_not_a_2xx(
    tx_db: Database, db_url: str, admin: asyncpg.Connection[Any]
) -> None:
    async with asgi_client(build_app(tx_db)) as client:
        response = await client.post("/deferred")
    assert response.status_code == 409
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == "conflict"
    assert await count(admin, db_url, "deferred_items") == 0


async def test_http_exception_in_the_handler_rolls_back(
    tx_db: Database, db_url: str, admin: asyncpg.Connection[Any]
) -> None:
    async with asgi_client(build_app(tx_db)) as client:
        response = await client.post("/items/2/then-http-error")
    assert response.status_code == 400
    assert response.json()["detail"] == "rejected after the write"
    assert await count(admin, db_url, "items") == 0


async def test_unexpected_exception_rolls_back_and_hides_internals(
    tx_db: Database, db_url: str, admin: asyncpg.Connection[Any]
) -> None:
    async with asgi_client(build_app(tx_db)) as client:
        response = await client.post("/items/3/then-crash", headers={"X-Request-ID": "req-42"})
    assert response.status_code == 500
    body = response.json()
    assert body["code"] == "internal"
    assert body["correlation_id"] == "req-42"
    assert response.headers["x-request-id"] == "req-42"
    for leak in ("secret", "SELECT", "RuntimeError", "Traceback"):
        assert leak not in response.text
    assert await count(admin, db_url, "items") == 0


async def test_a_handler_that_ends_its_transaction_itself_gets_a_500_not_a_2xx(
    tx_db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    async with asgi_client(build_app(tx_db)) as client:
        response = await client.post("/items/4/own-commit")
    assert response.status_code == 500
    assert response.json()["code"] == "internal"
    assert "TransactionEndedError" in caplog.text
    assert tx_db.stats().in_use == 0


async def test_a_handler_that_begins_a_transaction_and_leaves_it_open_gets_a_500(
    tx_db: Database, db_url: str, admin: asyncpg.Connection[Any]
) -> None:
    async with asgi_client(build_app(tx_db)) as client:
        response = await client.post("/items/5/own-begin")
    assert response.status_code == 500
    assert response.json()["code"] == "internal"
    assert await count(admin, db_url, "items") == 0


async def test_cancelling_the_request_task_mid_query_releases_everything(
    tx_db: Database, db_name: str, db_url: str, admin: asyncpg.Connection[Any]
) -> None:
    async with asgi_client(build_app(tx_db)) as client:
        task = asyncio.create_task(client.post("/sleep"))

        async def sleeping() -> bool:
            return any(
                "pg_sleep" in (r["query"] or "") and r["state"] == "active"
                for r in await backends(admin, db_name)
            )

        assert await wait_for(sleeping)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    async def released() -> bool:
        return await no_leaks(admin, db_name, tx_db)

    assert await wait_for(released)
    assert await count(admin, db_url, "items") == 0


@pytest.mark.parametrize("http", ["httptools", PROTOCOL])
@pytest.mark.parametrize("path", ["/sleep", "/sleep-autocommit"])
async def test_client_disconnect_cancels_the_query_and_releases_the_connection(
    path: str,
    http: str,
    tx_db: Database,
    db_name: str,
    db_url: str,
    admin: asyncpg.Connection[Any],
) -> None:
    app = build_app(tx_db)
    async with LiveServer(app, http=http) as server:
        method = "POST" if path == "/sleep" else "GET"
        async with httpx.AsyncClient(base_url=server.url) as client:
            with pytest.raises(httpx.ReadTimeout):
                await client.request(method, path, timeout=httpx.Timeout(5, read=0.5))

        # pg_sleep(30) would still be running if the disconnect had not cancelled it.
        async def released() -> bool:
            return await no_leaks(admin, db_name, tx_db)

        assert await wait_for(released, timeout=5)
    assert await count(admin, db_url, "items") == 0


async def test_under_pglayers_http_server_a_slow_request_is_not_watched(
    tx_db: Database, db_name: str, admin: asyncpg.Connection[Any]
) -> None:
    # The server tells the guard when the client leaves: nothing polls in-flight requests.
    app = build_app(tx_db)
    async with LiveServer(app, http=PROTOCOL) as server, httpx.AsyncClient() as client:
        request = asyncio.create_task(client.get(f"{server.url}/sleep-autocommit", timeout=10))

        async def sleeping() -> bool:
            return any("pg_sleep" in (r["query"] or "") for r in await backends(admin, db_name))

        assert await wait_for(sleeping)
        await asyncio.sleep(WATCH_AFTER * 3)
        guard = getattr(app.state, FRONT_DOOR_KEY)
        assert not guard._pending
        assert not guard._polled
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request


async def test_a_server_without_uvicorns_disconnect_flag_is_watched_with_a_task(
    tx_db: Database, db_name: str, admin: asyncpg.Connection[Any]
) -> None:
    app = build_app(tx_db)
    delivered = False

    async def receive() -> Message:
        # A plain function, not uvicorn's request cycle: the guard must await it.
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.sleep(0.3)
        return {"type": "http.disconnect"}

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    scope: Scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
        "method": "GET", "scheme": "http", "path": "/sleep-autocommit", "raw_path": b"",
        "root_path": "", "query_string": b"", "headers": [], "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80), "state": {},
    }  # fmt: skip
    async with app.router.lifespan_context(app):
        # pg_sleep(30) inside: only the disconnect can end this within the wait below.
        await asyncio.wait_for(app(scope, receive, send), timeout=10)
    assert not any(m["type"] == "http.response.body" for m in sent)

    async def released() -> bool:
        return await no_leaks(admin, db_name, tx_db)

    assert await wait_for(released)


async def test_routes_that_skip_pglayers_body_checks_are_named_at_startup(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    app = FastAPI()

    @app.post("/before")
    async def before(body: dict[str, int]) -> dict[str, int]:
        return body

    early = APIRouter()

    @early.post("/routed")
    async def routed(body: dict[str, int]) -> dict[str, int]:
        return body

    app.include_router(early)
    setup(app, db)

    @app.post("/after")  # pglayer's Route from here on, for the app's own routes
    async def after(body: dict[str, int]) -> dict[str, int]:
        return body

    checked = APIRouter(prefix="/ok", route_class=Route)

    @checked.post("/checked")
    async def fine(body: dict[str, int]) -> dict[str, int]:
        return body

    late = APIRouter(prefix="/late")  # a router keeps its own route class
    late.post("/routed")(routed)
    app.include_router(checked)
    app.include_router(late)

    caplog.set_level("WARNING", logger="pglayer")
    async with app.router.lifespan_context(app):
        pass
    said = [r.getMessage() for r in caplog.records if "not pglayer's Route" in r.getMessage()]
    assert len(said) == 1, said
    assert said[0].startswith("3 route(s)")
    assert "/before, /late/routed, /routed;" in said[0]


async def test_the_shops_routes_all_take_pglayers_body_checks(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(db=db, settings=ShopSettings(admin_token=None))
    caplog.set_level("WARNING", logger="pglayer")
    async with app.router.lifespan_context(app):
        pass
    assert not [r for r in caplog.records if "not pglayer's Route" in r.getMessage()]


@pytest.mark.parametrize(
    ("options", "said"),
    [
        ({"isolation": "REPEATABLE READ"}, "read_committed, repeatable_read, serializable"),
        ({"isolation": "snapshot"}, "is not one of"),
        ({"lock_timeout": 0}, "lock_timeout must be seconds above 0"),
        ({"lock_timeout": -1.0}, "lock_timeout must be seconds above 0"),
        ({"lock_timeout": float("nan")}, "lock_timeout must be seconds above 0"),
        ({"lock_timeout": 3e6}, "at most 86400"),  # past PostgreSQL's int milliseconds
        ({"lock_timeout": "1"}, "lock_timeout must be seconds above 0"),
        ({"lock_timeout": True}, "lock_timeout must be seconds above 0"),
    ],
)
def test_transaction_options_no_transaction_can_take_are_refused_where_they_are_written(
    options: dict[str, Any], said: str
) -> None:
    with pytest.raises(ValueError, match=said):
        transaction_dependency(**options)
    with pytest.raises(ValueError, match=said):
        transactional(**options)


@pytest.mark.parametrize("attempts", ["3", 0, -1, 1.5, True])
def test_attempts_no_replay_policy_can_take_are_refused_where_they_are_written(
    attempts: Any,
) -> None:
    # Read only on the conflict path: a per-request 500 no happy-path test would meet.
    with pytest.raises(ValueError, match="attempts must be a whole number"):
        transactional(attempts=attempts)


@pytest.mark.parametrize(
    ("options", "said"),
    [
        ({"attempts": "3"}, "attempts must be a whole number"),
        ({"lock_timeout": float("nan")}, "lock_timeout must be seconds above 0"),
        ({"lock_timeout": float("inf")}, "at most 86400"),
        ({"lock_timeout": "1s"}, "lock_timeout must be seconds above 0"),
    ],
)
async def test_run_in_transaction_refuses_options_no_transaction_can_take(
    tx_db: Database, options: dict[str, Any], said: str
) -> None:
    with pytest.raises(ValueError, match=said):
        await tx_db.run_in_transaction(lambda c: c.execute("SELECT 1"), **options)


@pytest.mark.parametrize("timeout", [float("nan"), 0, -1.0, "1", 10**400])
async def test_a_deadline_that_never_fires_or_has_passed_is_a_value_error(
    tx_db: Database, timeout: Any
) -> None:
    with pytest.raises(ValueError, match="timeout must be seconds above 0"):
        await tx_db.run(lambda c: c.fetchval("SELECT 1"), timeout=timeout)
    with pytest.raises(ValueError, match="timeout must be seconds above 0"):
        await tx_db.run(lambda c: c.fetchval("SELECT 1", timeout=timeout))
    with pytest.raises(ValueError, match="timeout must be seconds above 0"):
        async with tx_db.connection(timeout=timeout):
            pass
    assert tx_db.stats().in_use == 0


async def test_a_deadline_or_a_concurrency_bound_that_bounds_nothing_is_a_value_error(
    tx_db: Database,
) -> None:
    with pytest.raises(ValueError, match="a deadline is seconds"), deadline(float("nan")):
        pass
    with pytest.raises(ValueError, match="max_connections must be a whole number"):
        await gather(tx_db, lambda c: c.fetchval("SELECT 1"), max_connections=float("nan"))  # type: ignore[call-overload]


async def test_a_lock_bound_given_as_text_is_a_value_error_in_a_transaction_block(
    tx_db: Database,
) -> None:
    with pytest.raises(ValueError, match="lock_timeout must be seconds above 0"):
        async with tx_db.transaction(lock_timeout="1"):  # type: ignore[arg-type]
            pass
    assert tx_db.stats().in_use == 0


async def test_an_unknown_isolation_level_is_a_value_error_at_the_call(tx_db: Database) -> None:
    with pytest.raises(ValueError, match="is not one of"):
        async with tx_db.transaction(isolation="Serializable"):  # type: ignore[arg-type]
            pass
    assert tx_db.stats().in_use == 0


async def test_a_lock_bound_no_transaction_can_take_is_a_value_error_at_the_call(
    tx_db: Database,
) -> None:
    with pytest.raises(ValueError, match="lock_timeout"):
        await tx_db.run(lambda c: c.execute("SELECT 1"), lock_timeout=-1)

    async def nested_with_a_bad_isolation() -> None:
        async with (
            tx_db.connection() as conn,
            conn.transaction(),
            conn.transaction(isolation="bad"),  # type: ignore[arg-type]
        ):
            pass

    with pytest.raises(ValueError, match="is not one of"):
        await nested_with_a_bad_isolation()


class Item(BaseModel):
    k: int


def routed_app(db: Database) -> FastAPI:
    """Routes whose connection parameters a `Route` opens itself."""
    app = FastAPI()
    setup(app, db)

    @app.post("/bodied")
    async def bodied(item: Item, conn: WriteTransaction) -> Item:
        await conn.execute("INSERT INTO items (k) VALUES ($1)", item.k)
        return item

    @app.post("/items/{k}/wrong-answer")
    async def wrong_answer(k: int, conn: WriteTransaction) -> Item:
        await conn.execute("INSERT INTO items (k) VALUES ($1)", k)
        return {"not": "an item"}  # type: ignore[return-value]

    @app.get("/twice")
    async def twice(conn: WriteTransaction, again: WriteTransaction) -> bool:
        return conn is again  # FastAPI solves a dependency once per request

    @app.post("/shared")
    async def shared(conn: WriteTransaction, seen: Annotated[Connection, Depends(audited)]) -> bool:
        return conn is seen

    return app


async def audited(conn: WriteTransaction) -> Connection:
    return conn


def route_of(app: FastAPI, path: str) -> APIRoute:
    [route] = [r for r in app.routes if isinstance(r, APIRoute) and r.path == path]
    return route


def test_a_route_opens_its_connection_itself_not_by_fastapis_dependency_solving(
    tx_db: Database,
) -> None:
    # Solved by FastAPI, a WriteTransaction cost a quarter more instructions a request than
    # the tutorial's `async with pool.acquire()`: contextlib, anyio, its request parameter.
    app = routed_app(tx_db)
    assert route_of(app, "/bodied").dependant.dependencies == []
    assert route_of(app, "/twice").dependant.dependencies == []
    assert [d.call for d in route_of(app, "/shared").dependant.dependencies] != []


async def test_a_body_is_checked_before_a_connection_is_taken(tx_db: Database) -> None:
    async with asgi_client(routed_app(tx_db)) as client:
        async with contextlib.AsyncExitStack() as held:  # every connection writes may take
            for _ in range(tx_db.stats().bulkheads["write"].cap):
                await held.enter_async_context(tx_db.connection())
            refused = await client.post("/bodied", json={"k": "seven"})
        created = await client.post("/bodied", json={"k": 7})
    assert refused.status_code == 422  # not a 503 after waiting for a connection
    assert (created.status_code, created.json()) == (200, {"k": 7})


async def test_an_answer_the_response_model_refuses_rolls_the_transaction_back(
    tx_db: Database, db_url: str, admin: asyncpg.Connection[Any]
) -> None:
    async with asgi_client(routed_app(tx_db)) as client:
        response = await client.post("/items/5/wrong-answer")
    assert response.status_code == 500
    assert await count(admin, db_url, "items") == 0


async def test_parameters_of_one_transaction_share_it_as_fastapi_solves_it_once(
    tx_db: Database,
) -> None:
    async with asgi_client(routed_app(tx_db)) as client:
        assert (await client.get("/twice")).json() is True
        assert (await client.post("/shared")).json() is True
