"""pglayer in an app of the user's own: dependency scopes, background work, WebSockets,
dependency overrides, mounted apps and errors after the response."""

from __future__ import annotations

import asyncio
import cProfile
import gc
import logging
import pstats
from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from typing import Annotated, Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import orjson
import pytest
from fastapi import APIRouter, BackgroundTasks, Depends, FastAPI, HTTPException, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from opentelemetry.trace import NoOpTracerProvider
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.routing import Route
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

import pglayer._gc
from pglayer import (
    Connection,
    ConnectionLostError,
    Database,
    PglayerError,
    ProgrammingError,
    UniqueViolationError,
)
from pglayer._logs import install_request_id
from pglayer._observability import RequestStats
from pglayer._ws import WS_PROTOCOL
from pglayer.fastapi import (
    Db,
    ReadConnection,
    WriteTransaction,
    get_database,
    health_router,
    ndjson_response,
    setup,
    transaction_dependency,
    transactional,
)
from pglayer.fastapi._middleware import STATS_KEY, current_request_id
from tests.conftest import (
    LiveServer,
    Server,
    asgi_client,
    free_port,
    refuses_to_start,
    settings_for,
    wait_for,
)
from tests.test_pool_faults import two_connections_allowed

# Module level: annotations are strings (`from __future__ import annotations`), read here.
LateSerializable = Annotated[Connection, Depends(transaction_dependency(isolation="serializable"))]
Serializable = Annotated[
    Connection, Depends(transaction_dependency(isolation="serializable"), scope="function")
]


def app_of(db: Database, **options: Any) -> FastAPI:
    app = FastAPI()
    setup(app, db, **options)
    return app


@asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[LiveServer]:
    async with app.router.lifespan_context(app), LiveServer(app, http="httptools") as server:
        yield server


def durations(app: FastAPI, route: str) -> list[float]:
    stats: RequestStats = getattr(app.state, STATS_KEY)
    return [s.duration.total for s in stats.snapshot() if s.route == route]


async def _audit(conn: LateSerializable) -> None:
    pass


@pytest.mark.parametrize("where", ["route", "router dependencies", "mounted app"])
async def test_a_transaction_dependency_in_fastapis_default_scope_refuses_to_start(
    db: Database, where: str
) -> None:
    # FastAPI's default scope ends the dependency after the response: a 2xx, then COMMIT.
    app = app_of(db)
    router = APIRouter()

    @router.post("/notes")
    async def add(conn: LateSerializable) -> None:
        pass

    @router.post("/audited")
    async def audited() -> None:
        pass

    if where == "route":
        app.include_router(router, prefix="/api")
        expected = r"/api/notes \(conn\)"
    elif where == "router dependencies":
        app.include_router(router, prefix="/api", dependencies=[Depends(_audit)])
        expected = r"/api/audited \(conn, of its router\)"
    else:
        sub = app_of(db)
        sub.include_router(router)
        app.mount("/sub", sub)  # its own lifespan never runs: the outer one's checks it
        expected = r"/sub/notes \(conn\)"
    await refuses_to_start(app, expected + '.*scope="function"')


async def test_a_transaction_dependency_in_function_scope_fails_before_its_response(
    db: Database,
) -> None:
    app = app_of(db)

    @app.post("/twice")
    async def twice(conn: Serializable) -> dict[str, str]:
        await conn.execute(
            "CREATE TEMP TABLE d (x int UNIQUE DEFERRABLE INITIALLY DEFERRED) ON COMMIT DROP;"
            " INSERT INTO d VALUES (1), (1)"
        )
        return {}

    async with app.router.lifespan_context(app), asgi_client(app) as client:
        response = await client.post("/twice")
    assert response.status_code == 409, response.text  # COMMIT failed, before the answer


async def test_background_work_has_no_request_deadline_and_is_not_timed_with_it(
    db: Database,
) -> None:
    app = app_of(db, request_timeout=0.2)
    setattr(app.state, STATS_KEY, RequestStats())
    results: list[Any] = []

    async def later() -> None:
        await asyncio.sleep(0.4)  # past the request's deadline
        results.append(await db.run(lambda c: c.fetchval("SELECT 1")))

    @app.post("/report", status_code=202)
    async def report(tasks: BackgroundTasks) -> None:
        tasks.add_task(later)

    async with app.router.lifespan_context(app), asgi_client(app) as client:
        response = await client.post("/report")
    assert response.status_code == 202
    assert results == [1]
    assert durations(app, "/report")[0] < 0.2


async def test_db_and_connections_reach_websocket_routes(db: Database) -> None:
    app = app_of(db)

    @app.websocket("/ws")
    async def ws(websocket: WebSocket, database: Db, conn: ReadConnection) -> None:
        await websocket.accept()
        one = await database.run(lambda c: c.fetchval("SELECT 1"))
        await websocket.send_json([one, await conn.fetchval("SELECT 2")])
        await websocket.close()

    async with running(app) as server, connect(f"ws://127.0.0.1:{server.port}/ws") as ws_:
        assert await ws_.recv() == "[1,2]"


@pytest.mark.parametrize(
    ("error", "code"),
    [(ConnectionLostError(), 1013), (UniqueViolationError(), 1008), (PglayerError(), 1011)],
)
async def test_a_database_error_in_a_websocket_closes_it_with_a_code_that_says_why(
    db: Database, error: PglayerError, code: int
) -> None:
    app = app_of(db)

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        raise error

    async with running(app) as server, connect(f"ws://127.0.0.1:{server.port}/ws") as ws_:
        with pytest.raises(ConnectionClosed) as closed:
            await ws_.recv()
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == code


async def test_an_override_of_get_database_reaches_every_dependency(db_url: str) -> None:
    async with (
        Database(settings_for(db_url, application_name="bound")) as bound,
        Database(settings_for(db_url, application_name="override")) as override,
    ):
        app = app_of(bound)
        name = "SELECT current_setting('application_name')"

        @app.get("/db")
        async def via_db(database: Db) -> str:
            return str(await database.run(lambda c: c.fetchval(name)))

        @app.post("/tx")
        async def via_tx(conn: WriteTransaction) -> str:
            return str(await conn.fetchval(name))

        app.dependency_overrides[get_database] = lambda: override
        async with asgi_client(app) as client:
            answers = [(await client.get("/db")).json(), (await client.post("/tx")).json()]
    assert answers == ["override", "override"]


async def test_a_mounted_app_is_guarded_once_and_labelled_by_its_full_path(
    db: Database,
) -> None:
    app, sub = app_of(db), app_of(db)
    setattr(app.state, STATS_KEY, RequestStats())

    router = APIRouter()

    @router.get("/count")
    async def count(database: Db) -> int:
        return int(await database.run(lambda c: c.fetchval("SELECT 3")))

    sub.include_router(router, prefix="/inc")
    app.mount("/sub", sub)
    async with app.router.lifespan_context(app), asgi_client(app) as client:
        response = await client.get("/sub/inc/count")
        await client.get("/sub/nothing/here")
    assert response.json() == 3
    assert len(response.headers.get_list("x-request-id")) == 1
    assert len(durations(app, "/sub/inc/count")) == 1  # the mount's and the router's prefix
    assert len(durations(app, "unmatched")) == 1


async def test_routes_of_a_router_included_twice_are_labelled_by_their_prefixes(
    db: Database,
) -> None:
    app = app_of(db)
    setattr(app.state, STATS_KEY, RequestStats())
    router = APIRouter()

    @router.get("/thing/{tid}")
    async def thing(tid: int) -> int:
        return tid

    app.include_router(router, prefix="/a")
    app.include_router(router, prefix="/b")
    async with asgi_client(app) as client:
        await client.get("/a/thing/1")
        await client.get("/b/thing/2")
    assert len(durations(app, "/a/thing/{tid}")) == len(durations(app, "/b/thing/{tid}")) == 1


async def test_an_error_of_background_work_is_logged_once_as_itself(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    app = app_of(db)

    async def later() -> None:
        await db.run(lambda c: c.execute("SELECT * FROM no_such_table"), retry=False)

    @app.post("/later", status_code=202)
    async def start(tasks: BackgroundTasks) -> None:
        tasks.add_task(later)

    caplog.set_level(logging.WARNING)
    async with app.router.lifespan_context(app), asgi_client(app) as client:
        assert (await client.post("/later")).status_code == 202
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert "ProgrammingError after its response was complete" in errors[0]


async def test_a_stream_that_fails_midway_is_cut_short_and_logged_once(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    app = app_of(db)

    async def rows() -> AsyncIterator[bytes]:
        yield b"one\n"
        raise ProgrammingError("the second row failed")

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        return StreamingResponse(rows(), media_type="text/plain")

    caplog.set_level(logging.WARNING)
    async with running(app) as server, httpx.AsyncClient(base_url=server.url) as client:
        with pytest.raises(httpx.RemoteProtocolError):  # no final chunk: incomplete
            await client.get("/stream")
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.name for r in errors] == ["pglayer.http"], [r.getMessage() for r in errors]
    assert "ProgrammingError while the response was being sent" in errors[0].getMessage()


async def test_a_stream_completed_by_a_base_http_middleware_is_still_logged_as_cut_short(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    app = app_of(db)

    async def passthrough(request: Any, call_next: Any) -> Any:
        return await call_next(request)

    app.add_middleware(BaseHTTPMiddleware, dispatch=passthrough)

    @app.get("/export")
    async def export(database: Db) -> StreamingResponse:
        sql = "SELECT 1 / (g - 5) AS n FROM generate_series(1, 10) g"
        return await ndjson_response(database, sql, batch=2)

    caplog.set_level(logging.WARNING)
    async with app.router.lifespan_context(app), asgi_client(app) as client:
        await client.get("/export")
    said = [r.getMessage() for r in caplog.records if r.name == "pglayer.http"]
    assert any("stream cut short after a middleware completed" in m for m in said), said


async def test_the_apps_own_validation_handler_is_kept(db: Database) -> None:
    app = FastAPI()

    @app.exception_handler(RequestValidationError)
    async def mine(request: Any, exc: Exception) -> JSONResponse:
        return JSONResponse({"mine": True}, status_code=400)

    setup(app, db)

    @app.get("/n/{n}")
    async def n(n: int) -> int:
        return n

    async with asgi_client(app) as client:
        response = await client.get("/n/x")
    assert (response.status_code, response.json()) == (400, {"mine": True})


async def test_an_http_exception_keeps_its_structured_detail_and_gets_a_code(
    db: Database,
) -> None:
    app = app_of(db)

    @app.get("/limited")
    async def limited() -> None:
        raise HTTPException(429, detail={"field": "name", "why": "taken"})

    async with asgi_client(app) as client:
        problem = (await client.get("/limited")).json()
    assert problem["code"] == "too_many_requests"
    assert orjson.loads(problem["detail"]) == {"field": "name", "why": "taken"}


async def test_a_database_error_before_a_websocket_is_accepted_is_an_http_problem(
    db: Database,
) -> None:
    app = app_of(db)

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        raise ConnectionLostError()  # as a connection dependency fails, before accept

    async with running(app) as server:
        with pytest.raises(InvalidStatus) as refused:
            await connect(f"ws://127.0.0.1:{server.port}/ws")
    response = refused.value.response
    assert response.status_code == 503  # not uvicorn's 403: the client may retry
    assert response.headers["retry-after"]


async def test_a_websocket_handshake_where_no_websocket_route_is_gets_a_404_problem(
    db: Database,
) -> None:
    app = app_of(db)

    @app.get("/page")
    async def page() -> str:
        return "a page"

    async with running(app) as server:
        with pytest.raises(InvalidStatus) as refused:
            await connect(f"ws://127.0.0.1:{server.port}/page")
    response = refused.value.response
    assert response.status_code == 404  # not uvicorn's bare 403
    assert response.headers["content-type"] == "application/problem+json"
    assert orjson.loads(response.body)["code"] == "not_found"


async def test_a_handshake_refused_with_a_problem_logs_no_error_under_serve(
    db: Database, capfd: pytest.CaptureFixture[str]
) -> None:
    # uvicorn took a denial response for an app that never answered: an ERROR line for each
    # stray probe, which the alerts on errors count.
    app = app_of(db)

    @app.get("/page")
    async def page() -> str:
        return "a page"

    async with LiveServer(app, http="httptools", ws=WS_PROTOCOL) as server:
        with pytest.raises(InvalidStatus) as refused:
            await connect(f"ws://127.0.0.1:{server.port}/page")
    assert refused.value.response.status_code == 404
    assert "without completing handshake" not in capfd.readouterr().err


def access_fields(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    names = ("method", "path", "route", "status", "request_id")
    lines = [r for r in caplog.records if r.name == "pglayer.access"]
    return [{k: getattr(r, k) for k in names} for r in lines]


async def test_a_response_the_servers_shutdown_cuts_midway_is_logged_cut_short(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    # A stream still sending when the shutdown's grace ran out was logged as a plain 200.
    app = app_of(db, access_log=True)
    caplog.set_level("INFO", logger="pglayer.access")

    @app.get("/slow")
    async def slow() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            yield b"first"
            await asyncio.Event().wait()  # the rest never comes
            yield b"never"

        return StreamingResponse(chunks())

    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": "/slow", "raw_path": b"/slow", "query_string": b"",
        "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
        "headers": [(b"host", b"app")],
    }  # fmt: skip
    async with app.router.lifespan_context(app):
        task = asyncio.create_task(app(scope, receive, send))
        await wait_for(lambda: asyncio.sleep(0, len(sent) >= 2))
        task.cancel()  # what uvicorn does once its graceful shutdown times out
        await asyncio.gather(task, return_exceptions=True)
    [line] = [r.getMessage() for r in caplog.records if r.name == "pglayer.access"]
    assert line.endswith("cut short"), line


async def test_a_websocket_has_a_request_id_and_an_access_line(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    # Handshakes left no trace in the access log, and a handler's logs had no request id.
    app = app_of(db, access_log=True)
    install_request_id()
    caplog.set_level("INFO", logger="pglayer.access")

    @app.websocket("/rooms/{room}")
    async def ws(websocket: WebSocket, room: int) -> None:
        await websocket.accept()
        await websocket.send_text(current_request_id())
        await websocket.close()

    async with (
        running(app) as server,
        connect(f"ws://127.0.0.1:{server.port}/rooms/7", additional_headers=ID) as ws_,
    ):
        assert await ws_.recv() == "ws-1"
        assert ws_.response is not None
        assert ws_.response.headers["x-request-id"] == "ws-1"
    line = {"method": "WS", "path": "/rooms/7", "route": "/rooms/{room}", "status": 101}
    assert access_fields(caplog) == [{**line, "request_id": "ws-1"}]


async def test_a_refused_websocket_handshake_has_a_request_id_and_an_access_line(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    app = app_of(db, access_log=True)
    install_request_id()
    caplog.set_level("INFO", logger="pglayer.access")
    async with running(app) as server:
        with pytest.raises(InvalidStatus) as refused:
            await connect(f"ws://127.0.0.1:{server.port}/nowhere", additional_headers=ID)
    assert refused.value.response.headers["x-request-id"] == "ws-1"
    [line] = access_fields(caplog)
    assert (line["method"], line["status"], line["request_id"]) == ("WS", 404, "ws-1")


ID = {"X-Request-ID": "ws-1"}


async def test_an_unexpected_error_in_a_websocket_closes_it_with_1011(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    app = app_of(db)

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        raise RuntimeError("a bug")

    async with running(app) as server, connect(f"ws://127.0.0.1:{server.port}/ws") as ws_:
        with pytest.raises(ConnectionClosed) as closed:
            await ws_.recv()
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1011  # not 1006, the connection dropped
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert said == ["websocket /ws -> closed, 500 internal (RuntimeError)"], said


@pytest.mark.parametrize(
    ("read", "frame", "code", "reason"),
    [
        ("text", b"\x00", 1003, "unsupported_media_type"),  # bytes where text is read
        ("json", b"\x00", 1003, "unsupported_media_type"),
        ("json", "not json", 1007, "validation_error"),
        ("binary json", b"\xff\xfe", 1007, "validation_error"),  # not even UTF-8
        ("json", "[" * 100_000, 1007, "validation_error"),  # the decoder's RecursionError
    ],
)
async def test_a_frame_a_websocket_handler_cannot_read_closes_it_saying_why(
    db: Database,
    caplog: pytest.LogCaptureFixture,
    read: str,
    frame: str | bytes,
    code: int,
    reason: str,
) -> None:
    # Starlette's KeyError (a frame of the other type) or the JSON decoder's error was a
    # 1011 and an ERROR with a traceback: any client could fill the log and the alerts.
    app = app_of(db)

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        if read == "text":
            await websocket.receive_text()
        else:
            await websocket.receive_json(mode="binary" if read == "binary json" else "text")

    async with running(app) as server, connect(f"ws://127.0.0.1:{server.port}/ws") as ws_:
        await ws_.send(frame)
        with pytest.raises(ConnectionClosed) as closed:
            await ws_.recv()
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (code, reason)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_key_error_of_the_apps_own_in_a_websocket_is_still_a_bug(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    app = app_of(db)

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        message = await websocket.receive()
        print(message["text"])  # a bug of the app's: the same KeyError, its own

    async with running(app) as server, connect(f"ws://127.0.0.1:{server.port}/ws") as ws_:
        await ws_.send(b"\x00")
        with pytest.raises(ConnectionClosed) as closed:
            await ws_.recv()
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1011


async def test_an_unexpected_error_before_a_websocket_is_accepted_is_a_500_problem(
    db: Database,
) -> None:
    app = app_of(db)

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        raise RuntimeError("a bug")

    async with running(app) as server:
        with pytest.raises(InvalidStatus) as refused:
            await connect(f"ws://127.0.0.1:{server.port}/ws")
    response = refused.value.response
    assert response.status_code == 500  # not uvicorn's bare 403
    assert response.headers["content-type"] == "application/problem+json"
    assert orjson.loads(response.body)["code"] == "internal"


async def test_a_commit_that_fails_after_its_websocket_closed_is_logged(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    app = app_of(db)

    @app.websocket("/ws")
    async def ws(websocket: WebSocket, conn: WriteTransaction) -> None:
        await websocket.accept()
        await conn.execute(
            "CREATE TEMP TABLE d (x int UNIQUE DEFERRABLE INITIALLY DEFERRED) ON COMMIT DROP;"
            " INSERT INTO d VALUES (1), (1)"
        )
        await websocket.close()  # then the dependency commits, and COMMIT fails

    async with running(app) as server, connect(f"ws://127.0.0.1:{server.port}/ws") as ws_:
        with pytest.raises(ConnectionClosed):
            await ws_.recv()
        await asyncio.sleep(0.2)
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("already closed: lost" in m and "UniqueViolationError" in m for m in said), said


async def test_a_405_inside_a_mounted_app_lists_its_own_methods(db: Database) -> None:
    app, sub = app_of(db), app_of(db)

    @sub.get("/items/{n}")
    async def item(n: int) -> int:
        return n

    app.mount("/sub", sub)
    async with asgi_client(app) as client:
        response = await client.delete("/sub/items/1")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, HEAD"


async def test_the_apps_own_500_handler_is_not_taken_for_work_after_the_response(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    app = FastAPI()

    @app.exception_handler(Exception)
    async def mine(request: Any, exc: Exception) -> JSONResponse:
        return JSONResponse({"own500": True}, status_code=500)

    setup(app, db)

    @app.get("/crash")
    async def crash() -> None:
        raise RuntimeError("a bug")

    async with asgi_client(app) as client:
        response = await client.get("/crash")
    assert (response.status_code, response.json()) == (500, {"own500": True})
    assert not [r for r in caplog.records if "background work" in r.getMessage()]


async def test_plain_starlette_routes_and_mounts_are_labelled_by_their_templates(
    db: Database,
) -> None:
    app = app_of(db)
    setattr(app.state, STATS_KEY, RequestStats())
    app.router.routes.append(Route("/plain/{x}", lambda request: PlainTextResponse("p")))
    app.mount("/files", lambda scope, receive, send: PlainTextResponse("f")(scope, receive, send))
    async with asgi_client(app) as client:
        for path in ("/openapi.json", "/docs", "/plain/1", "/plain/2", "/files/a/b", "/nowhere"):
            await client.get(path)
    stats: RequestStats = getattr(app.state, STATS_KEY)
    counted = {s.route: s.duration.count for s in stats.snapshot()}
    assert counted == {
        "/openapi.json": 1,
        "/docs": 1,
        "/plain/{x}": 2,
        "/files/{path:path}": 1,
        "unmatched": 1,
    }


async def test_the_error_line_of_a_head_request_says_head(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    app = app_of(db)

    @app.get("/crash")
    async def crash() -> None:
        raise RuntimeError("a bug")

    caplog.set_level(logging.WARNING)
    async with asgi_client(app) as client:
        response = await client.head("/crash")
    assert response.status_code == 500
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert said == [
        f"unhandled RuntimeError on HEAD /crash (request_id={response.headers['x-request-id']})"
    ]


async def test_a_route_with_two_transactions_refuses_to_start(db: Database) -> None:
    # Each dependency commits on its own: a failure in one would leave the other applied.
    app = app_of(db)

    @app.post("/both")
    async def both(conn: WriteTransaction, strict: Serializable) -> None:
        pass

    @app.post("/same-twice")  # FastAPI gives both parameters the one transaction
    async def same_twice(conn: WriteTransaction, again: WriteTransaction) -> None:
        pass

    await refuses_to_start(app, r"two transactions.*: /both \(conn, strict\)$")


async def test_a_transactional_handler_with_a_transaction_dependency_refuses_to_start(
    db: Database,
) -> None:
    # @transactional replays the handler; the dependency's transaction would commit once,
    # with every attempt's writes in it.
    app = app_of(db)

    @app.post("/replayed")
    @transactional()
    async def replayed(conn: Connection, other: WriteTransaction) -> None:
        pass

    await refuses_to_start(app, r"@transactional.*: /replayed \(other\)$")


async def test_a_client_leaving_a_websocket_is_not_an_error(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    app = app_of(db)

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        while True:  # as an app waiting for messages would: the client's leaving raises
            await websocket.receive_text()

    async with running(app) as server:
        async with connect(f"ws://127.0.0.1:{server.port}/ws") as ws_:
            await ws_.send("hi")
        await asyncio.sleep(0.2)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_websocket_ending_brings_a_collection_in_a_tuned_process(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What a socket dropped mid-message leaves in reference cycles (its partial message) is
    # freed then, not after the tuned threshold's 200,000 allocations.
    monkeypatch.setattr(pglayer._gc, "_tuned", True)
    monkeypatch.setattr(pglayer._gc, "_COLLECT_AFTER", 0.05)
    app = app_of(db)
    full: list[int] = []

    def seen(phase: str, info: dict[str, int]) -> None:
        if phase == "start" and info["generation"] == 2:
            full.append(1)

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.receive_text()

    gc.callbacks.append(seen)
    try:
        async with running(app) as server:
            async with connect(f"ws://127.0.0.1:{server.port}/ws") as ws_:
                await ws_.send("hi")
            await asyncio.sleep(0.5)
    finally:
        gc.callbacks.remove(seen)
    assert full


async def test_ready_says_a_saturated_pool_is_saturated_not_down(db_url: str) -> None:
    async with Database(settings_for(db_url, min_size=1, max_size=1)) as db:
        app = app_of(db)
        app.include_router(health_router(ready_timeout=0.2))
        async with asgi_client(app) as client, db.connection():  # its only connection held
            ready = await client.get("/health/ready")
    assert ready.status_code == 503
    assert ready.json()["pools"] == {"primary": "saturated"}


async def test_ready_says_a_database_that_cannot_be_reached_is_not_a_deadline_missed() -> None:
    # Refused at once, it said "did not answer within the deadline", in 2 ms.
    url = f"postgresql://app:pw@127.0.0.1:{free_port()}/app"
    db = Database(settings_for(url, require_on_startup=False, connect_timeout=0.2))
    async with db:
        ready = await _ready(db)
    assert ready.status_code == 503
    assert ready.json()["pools"] == {"primary": "down"}
    assert ready.json()["detail"].startswith("The database cannot be reached now")


async def _ready(db: Database) -> httpx.Response:
    app = app_of(db)
    app.include_router(health_router(ready_timeout=0.5))
    async with asgi_client(app) as client:
        return await client.get("/health/ready")


@asynccontextmanager
async def _slots_taken(
    server: Server, admin: asyncpg.Connection[Any], db_name: str
) -> AsyncIterator[str]:
    """The URL of a role whose two connections the server allows are held by others."""
    async with two_connections_allowed(server, admin, db_name) as url:
        others = [await asyncpg.connect(url) for _ in range(2)]
        try:
            yield url
        finally:
            for conn in others:
                await conn.close()


async def test_ready_says_a_server_that_refuses_connections_refused_not_down(
    server: Server, admin: asyncpg.Connection[Any], db_name: str
) -> None:
    # It answered (53300: its connection limit): "did not answer" sends an operator to the
    # network; the connections it lets in are held by others.
    async with (
        two_connections_allowed(server, admin, db_name) as url,
        Database(settings_for(url, min_size=0, max_size=2)) as db,
    ):
        role = urlsplit(url).username
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role
        )
        others = [await asyncpg.connect(url) for _ in range(2)]
        try:
            ready = await _ready(db)
        finally:
            for conn in others:
                await conn.close()
    assert ready.status_code == 503
    assert ready.json()["pools"] == {"primary": "refused"}
    assert "refused" in ready.json()["detail"]


async def test_ready_says_refused_while_a_refused_pool_opens_in_the_background(
    server: Server, admin: asyncpg.Connection[Any], db_name: str
) -> None:
    # A worker started with the database at its limit: "did not answer within the deadline".
    async with (
        _slots_taken(server, admin, db_name) as url,
        Database(settings_for(url, min_size=1, require_on_startup=False)) as db,
    ):
        assert db.stats().size == 0  # opening in the background
        ready = await _ready(db)
    assert ready.status_code == 503
    assert ready.json()["pools"] == {"primary": "refused"}


async def test_ready_says_refused_for_a_pool_the_servers_limit_keeps_small(
    server: Server, admin: asyncpg.Connection[Any], db_name: str
) -> None:
    # Two of its five connections in use, the server refusing a third: "down", "did not
    # answer within the deadline", answered in a fifth of a second.
    async with (
        two_connections_allowed(server, admin, db_name) as url,
        Database(settings_for(url, min_size=1, max_size=5)) as db,
        db.connection(),
        db.connection(),
    ):
        ready = await _ready(db)
    assert ready.status_code == 503
    assert ready.json()["pools"] == {"primary": "refused"}


async def test_an_override_with_a_database_nobody_opened_says_so_in_the_log(
    db: Database, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = app_of(db)
    unopened = Database(settings_for(db_url))

    @app.get("/count")
    async def count(database: Db) -> int:
        return int(await database.run(lambda c: c.fetchval("SELECT 1")))

    app.dependency_overrides[get_database] = lambda: unopened
    async with app.router.lifespan_context(app), asgi_client(app) as client:
        response = await client.get("/count")
    assert response.status_code == 503
    assert "the database is not open: `await db.open()`" in caplog.text


async def test_apps_that_share_a_database_keep_it_open_until_the_last_one_ends(
    db_url: str,
) -> None:
    db = Database(settings_for(db_url))
    first, second = app_of(db), app_of(db)
    async with first.router.lifespan_context(first):
        async with second.router.lifespan_context(second):
            pass
        async with db.connection() as conn:  # the first app still serves
            assert await conn.fetchval("SELECT 1") == 1
    assert not db.is_open


async def test_a_database_its_owner_opened_stays_open_after_the_apps_lifespan(
    db: Database,
) -> None:
    app = app_of(db)
    async with app.router.lifespan_context(app):
        pass
    assert db.is_open


def test_setup_twice_on_one_app_is_refused(db_url: str) -> None:
    app = app_of(Database(settings_for(db_url)))
    with pytest.raises(PglayerError, match="already called"):
        setup(app, Database(settings_for(db_url)))


async def test_a_4xx_the_database_decided_is_logged_with_its_sqlstate(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    # 22012 in a query is a bug that the client sees as a 422: the log must say which.
    app = app_of(db)

    @app.get("/divide")
    async def divide(conn: ReadConnection) -> int:
        return int(await conn.fetchval("SELECT 1/0"))

    caplog.set_level(logging.INFO, logger="pglayer")
    async with app.router.lifespan_context(app), asgi_client(app) as client:
        response = await client.get("/divide")
    assert response.status_code == 422
    said = [r for r in caplog.records if "sqlstate=22012" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.INFO]


async def test_without_a_telemetry_provider_fastapi_stops_asking_for_one(db: Database) -> None:
    # FastAPI 0.165 looked the three providers up on every request: ~20 Python calls.
    app = app_of(db)

    @app.get("/one")
    async def one() -> int:
        return 1

    async with app.router.lifespan_context(app), asgi_client(app) as client:
        profile = cProfile.Profile()
        profile.enable()
        answer = await client.get("/one")
        profile.disable()
    assert answer.status_code == 200
    called = {name for (_, _, name) in pstats.Stats(profile).stats}  # type: ignore[attr-defined]
    assert "get_tracer_provider" not in called
    assert "run_endpoint_function" in called  # the request was profiled


async def test_a_telemetry_provider_given_to_fastapi_keeps_its_telemetry(db: Database) -> None:
    app = FastAPI(telemetry={"tracer_provider": NoOpTracerProvider()})
    setup(app, db)
    async with app.router.lifespan_context(app):
        assert app._native_telemetry.enabled()
