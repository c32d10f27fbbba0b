"""Problem responses (RFC 9457): the one boundary where errors become HTTP answers."""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from http import HTTPStatus
from typing import Any

import orjson
from fastapi import FastAPI, Request, WebSocket
from fastapi.exception_handlers import (
    http_exception_handler,
    request_validation_exception_handler,
)
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Host, Match, Mount
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocketState

from pglayer._errors import (
    CheckViolationError,
    CommitIndeterminateError,
    DatabaseError,
    DatabaseNotAnsweringError,
    ForeignKeyViolationError,
    IdempotencyKeyReusedError,
    IntegrityError,
    InvalidInputError,
    LockTimeoutError,
    NotNullViolationError,
    PglayerError,
    PoolOverloadedError,
    PoolTimeoutError,
    QueryTimeoutError,
    SerializationError,
    TransientError,
    UniqueViolationError,
)
from pglayer._logs import Throttle, escape, left_out

__all__ = [
    "EXCHANGE_KEY",
    "MAX_ERRORS",
    "PROBLEM_JSON",
    "FieldError",
    "Problem",
    "ProblemDetails",
    "client_method",
    "field_error",
    "install_problem_handlers",
    "problem_response",
    "problem_responses",
]

# The scope key under which `RequestGuard` keeps its view of the request (`_Exchange`).
EXCHANGE_KEY = "pglayer.exchange"

_FASTAPI_DEFAULTS = (http_exception_handler, request_validation_exception_handler)
Handler = Callable[[Any, Exception], Awaitable[Response | None]]

log = logging.getLogger("pglayer.http")


def client_method(scope: Any) -> str:
    """The method the client sent: the app sees a HEAD request as a GET."""
    exchange = scope.get(EXCHANGE_KEY)
    return "HEAD" if exchange is not None and exchange.head else str(scope.get("method", ""))


PROBLEM_JSON = "application/problem+json"
RETRY_AFTER_SECONDS = 1
# A predicted wait further out says more about a stalled pace (connections being rebuilt
# after a restart: one a few seconds) than about when a connection will be free.
RETRY_AFTER_MAX = 10
MAX_ERRORS = 20  # field errors listed in a 422; `detail` gives the full count
MAX_PROBLEM_BYTES = 16 * 1024
OMITTED_ERRORS = "pglayer.omitted_errors"  # scope key: errors not validated, but counted
_CLIP = 64  # characters of a name the client chose (a key, a header) echoed back
_CLIP_MSG = 200
_CLIP_LOC = 8  # parts of an error's location
_METHOD_ORDER = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")

_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Content Too Large",  # RFC 9110 (RFC 7231: "Payload Too Large")
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    500: "Internal Server Error",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}
_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    500: "internal",
    503: "unavailable",
    504: "timeout",
}

UNEXPECTED = "An unexpected error occurred. Quote the correlation id when reporting it."

# Most specific first: the first class the error is an instance of decides.
_DATABASE_PROBLEMS: tuple[tuple[type[PglayerError], int, str, str], ...] = (
    (PoolOverloadedError, 503, "overloaded", "The service is overloaded. Retry later."),
    (LockTimeoutError, 503, "busy", "The resource is busy with another request. Retry later."),
    (
        SerializationError,  # deadlocks too: contention, not an outage
        503,
        "busy",
        "The request conflicted with concurrent changes to the same data. Retry later.",
    ),
    (TransientError, 503, "unavailable", "The database is temporarily unavailable. Retry later."),
    (
        CommitIndeterminateError,
        500,
        "commit_unknown",
        "The connection to the database was lost while the change was being committed, so"
        " it may or may not have been applied. Read the resource back, or resend the request"
        " with the same Idempotency-Key.",
    ),
    (
        DatabaseNotAnsweringError,
        503,
        "unavailable",
        "The database is not answering. Retry later.",
    ),
    (QueryTimeoutError, 504, "timeout", "The database did not answer within the deadline."),
    (UniqueViolationError, 409, "conflict", "A resource with these values already exists."),
    (ForeignKeyViolationError, 409, "conflict", "A referenced resource does not exist."),
    (CheckViolationError, 422, "validation_error", "A value is outside its allowed range."),
    (NotNullViolationError, 422, "validation_error", "A required value is missing."),
    (InvalidInputError, 422, "validation_error", "A value is not valid for its type."),
    # Any other constraint (exclusion, restrict): the data conflicts with what is stored.
    (IntegrityError, 409, "conflict", "The change conflicts with existing data."),
    (
        IdempotencyKeyReusedError,
        422,
        "idempotency_key_reused",
        "This Idempotency-Key was used with a different request body.",
    ),
)


class FieldError(BaseModel):
    """One offending field of a 422: where, what, and pydantic's error type."""

    loc: list[str | int] = Field(examples=[["body", "amount"]])
    msg: str
    type: str = Field(examples=["value_error"])


class ProblemDetails(BaseModel):
    """The body of every error response (for OpenAPI)."""

    type: str = Field(examples=["urn:pglayer:problem:not_found"])
    title: str
    status: int
    detail: str
    code: str = Field(examples=["not_found"])
    errors: list[FieldError] | None = Field(
        default=None,
        description=f"Offending fields, on validation errors: at most {MAX_ERRORS}",
        max_length=MAX_ERRORS,
    )
    correlation_id: str | None = Field(default=None, description="On internal errors")


_DESCRIPTIONS = {
    400: "A head HTTP/1.1 does not allow (`validation_error`; `pglayer serve`)",
    401: "Missing or wrong bearer token (`unauthorized`)",
    404: "Not found (`not_found`)",
    405: "Method not supported on this path (`method_not_allowed`); `Allow` lists those it"
    " supports",
    409: "Conflict (`conflict`)",
    413: "Body over 1 MiB (`payload_too_large`)",
    415: "Body not sent as `application/json`, or with a `Content-Encoding`"
    " (`unsupported_media_type`)",
    422: "Invalid input (`validation_error`)",
    500: "Unexpected error (`internal`), with a correlation id; or a commit whose outcome is"
    " unknown (`commit_unknown`, no `Retry-After`)",
    503: "Database unavailable, overloaded or a row busy (`unavailable`, `overloaded`, `busy`);"
    " has `Retry-After`",
    504: "Database deadline exceeded (`timeout`)",
    408: "Headers or body too slow to arrive (`timeout`; `pglayer serve`)",
    431: "Request line and headers over `PGLAYER_MAX_HEADER_SIZE` (`payload_too_large`;"
    " `pglayer serve`)",
    501: "A method or transfer coding the server does not implement (`method_not_allowed`,"
    " `unsupported_media_type`; `pglayer serve`)",
    505: "An HTTP version other than 1.0 and 1.1 (`validation_error`; `pglayer serve`)",
}


def problem_responses(*statuses: int, **descriptions: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries for these statuses, plus 500/503/504 that any route may give.

    `descriptions` overrides by status, as `_409="..."`.
    """
    out: dict[int | str, dict[str, Any]] = {}
    for status in (*statuses, 500, 503, 504):
        description = descriptions.get(f"_{status}", _DESCRIPTIONS.get(status, "Error"))
        out[status] = {
            "model": ProblemDetails,
            "description": description,
            "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/ProblemDetails"}}},
        }
    return out


def _code_of(status: int) -> str:
    """A code for a status without one of its own: its phrase, as 429's `too_many_requests`."""
    return re.sub(r"[^a-z0-9]+", "_", _phrase(status).lower()).strip("_") or "error"


def _phrase(status: int) -> str:
    """HTTP's reason phrase for `status` (418: "I'm a Teapot"), or "Error"."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


class Problem(Exception):
    """An error that becomes a problem response as it is; raise it from handlers."""

    def __init__(
        self,
        status: int,
        code: str | None = None,
        detail: str = "",
        *,
        title: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail or code or str(status))
        self.status = status
        self.code = code or _CODES.get(status) or _code_of(status)
        self.title = title or _TITLES.get(status) or _phrase(status)
        self.detail = detail or self.title
        self.headers = headers or {}
        self.extra = extra


_COUNTED = re.compile(r"\d+ invalid values?\b")


def problem_response(problem: Problem) -> Response:
    """Render a `Problem` as `application/problem+json`."""
    detail = problem.detail
    errors = problem.extra.get("errors")
    if problem.status == 422 and errors and not _COUNTED.match(detail):
        # Every 422 says how many values were invalid, however it was raised.
        detail = f"{len(errors)} invalid value{'' if len(errors) == 1 else 's'}: {detail}"
    body = {
        "type": f"urn:pglayer:problem:{problem.code}",
        "title": problem.title,
        "status": problem.status,
        "detail": detail,
        "code": problem.code,
        **problem.extra,
    }
    headers = dict(problem.headers)
    if problem.status == 503:
        headers.setdefault("Retry-After", str(RETRY_AFTER_SECONDS))
    data = orjson.dumps(body)
    if len(data) > MAX_PROBLEM_BYTES:
        data = _shrunk(body)
    return Response(data, problem.status, headers, media_type=PROBLEM_JSON)


def _shrunk(body: dict[str, Any]) -> bytes:
    # Whatever an app put in a problem, the answer stays small: long texts are cut first,
    # then field errors are dropped from the end.
    body = {k: clip(v, _CLIP_MSG * 4) if isinstance(v, str) else v for k, v in body.items()}
    data = orjson.dumps(body)
    while len(data) > MAX_PROBLEM_BYTES:
        errors = body.get("errors")
        if isinstance(errors, list) and errors:
            body["errors"] = errors[:-1]
        else:
            body = {k: body[k] for k in ("type", "title", "status", "detail", "code")}
        data = orjson.dumps(body)
    return data


def clip(text: str, limit: int = _CLIP) -> str:
    """`text` cut to `limit` characters, marked with an ellipsis when it was longer."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


# pydantic writes a Decimal bound as Python would ("less than or equal to Decimal('10.00')").
_DECIMAL = re.compile(r"Decimal\('([-0-9.Ee+]+)'\)")


def _plain(msg: str) -> str:
    return _DECIMAL.sub(r"\1", msg) if "Decimal(" in msg else msg


def field_error(loc: Sequence[Any], msg: str, type: str = "value_error") -> dict[str, Any]:
    """One entry of a 422's `errors`, with the client's names and text cut short."""
    parts: list[str | int] = [
        p if isinstance(p, int) and not isinstance(p, bool) else clip(str(p))
        for p in loc[:_CLIP_LOC]
    ]
    if len(loc) > _CLIP_LOC:
        parts.append("…")
    return {"loc": parts, "msg": clip(msg, _CLIP_MSG), "type": clip(type)}


def validation_problem(errors: Iterable[dict[str, Any]], total: int) -> Problem:
    """A 422 listing at most `MAX_ERRORS` of `errors` (already `field_error`s) of `total`."""
    listed = list(errors)[:MAX_ERRORS]
    names = ", ".join(dict.fromkeys(".".join(map(str, e["loc"])) or "request" for e in listed))
    detail = f"{total} invalid value{'' if total == 1 else 's'}"
    if total > len(listed):
        detail += f" (the first {len(listed)} are listed in `errors`)"
    return Problem(422, "validation_error", f"{detail}: {names}.", errors=listed)


def retry_after(seconds: float | None) -> str:
    """A `Retry-After` value: whole seconds, from 1 to `RETRY_AFTER_MAX`."""
    return str(min(max(math.ceil(seconds or 0), RETRY_AFTER_SECONDS), RETRY_AFTER_MAX))


def problem_for_database_error(exc: PglayerError) -> Problem:
    """The problem a pglayer error maps to; unknown ones are internal errors."""
    for cls, status, code, detail in _DATABASE_PROBLEMS:
        if isinstance(exc, cls):
            headers = None
            if isinstance(exc, PoolOverloadedError):
                headers = {"Retry-After": retry_after(exc.retry_after)}
            return Problem(status, code, detail, headers=headers)
    return Problem(500, "internal", UNEXPECTED)


_SAID = Throttle()


def _request_id(request: Request) -> str:
    return str(getattr(request.state, "request_id", "") or "-")


async def _on_problem(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Problem)
    return problem_response(exc)


async def _on_pglayer_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, PglayerError)
    problem = problem_for_database_error(exc)
    sqlstate = exc.sqlstate if isinstance(exc, DatabaseError) else None
    if problem.status >= 500 or sqlstate is not None:
        # Shed and timed-out acquires are counted in the pool's metrics; a warning per
        # request would add log volume exactly when the process is overloaded. A 4xx the
        # database decided (22012 in a query is a bug the client sees as a 422) is said at
        # INFO, with its SQLSTATE, for whoever looks for it.
        if problem.status == 500:
            level = logging.ERROR
        elif problem.status < 500 or isinstance(
            exc, PoolOverloadedError | PoolTimeoutError | LockTimeoutError
        ):
            level = logging.INFO
        else:
            level = logging.WARNING
        # An outage fails every request alike: a 503 line (and a 500's traceback) once a
        # second per kind, saying how many were left out; each 500 keeps its own line, whose
        # request id the client was given as its correlation id.
        count = _SAID.allow((problem.status, problem.code, type(exc)))
        if count is not None or problem.status == 500:
            log.log(
                level,
                "%s %s -> %s %s (%s, sqlstate=%s, request_id=%s)%s%s",
                escape(client_method(request.scope)),
                escape(request.scope.get("path", "")),
                problem.status,
                problem.code,
                type(exc).__name__,
                sqlstate,
                _request_id(request),
                # What only the app can mend (a database nothing opened) says how.
                f": {exc}" if getattr(exc, "lasting", False) else "",
                left_out(count or 0),
                exc_info=problem.status == 500 and count is not None,
            )
    if problem.status == 500:
        problem.extra["correlation_id"] = _request_id(request)
    elif isinstance(exc, IdempotencyKeyReusedError):
        loc = ["header", "Idempotency-Key"]
        problem.extra["errors"] = [field_error(loc, problem.detail, "idempotency_key_reused")]
    elif problem.status == 422:
        # The app did not say which field the database refused: the column, when known.
        column = exc.column if isinstance(exc, DatabaseError) else None
        loc = [column] if column else []
        problem.extra["errors"] = [field_error(loc, problem.detail, "database_value_error")]
    return problem_response(problem)


async def _on_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    # Keys left out before validation (see `pglayer.fastapi._bodies`) still count.
    total = len(errors) + int(request.scope.get(OMITTED_ERRORS, 0))
    listed = (
        field_error(e.get("loc", ()), _plain(str(e.get("msg", ""))), str(e.get("type", "")))
        for e in errors[:MAX_ERRORS]
    )
    return problem_response(validation_problem(listed, total))


def allowed_methods(scope: Scope) -> str:
    """`Allow` for the request's path: every method of every route that matches it (in the
    app that routed it: a mounted app's own)."""
    router = getattr(scope.get("app"), "router", None) or scope.get("router")
    methods = _methods_of(getattr(router, "routes", ()), scope)
    if "GET" in methods:
        methods.add("HEAD")  # answered by `RequestGuard` wherever GET is
    order = {m: i for i, m in enumerate(_METHOD_ORDER)}
    return ", ".join(sorted(methods, key=lambda m: (order.get(m, len(order)), m)))


def _methods_of(routes: Iterable[Any], scope: Scope) -> set[str]:
    methods: set[str] = set()
    for route in routes:
        route_methods = getattr(route, "methods", None)
        if route_methods:
            if route.matches(scope)[0] is not Match.NONE:
                methods |= route_methods
        elif isinstance(route, Mount):
            match, child = route.matches(scope)
            if match is Match.FULL:  # an app mounted here: its own routes, under its prefix
                methods |= _methods_of(route.routes, {**scope, **child})
        elif not isinstance(route, Host) and route.matches(scope)[0] is not Match.NONE:
            # A group of routes (FastAPI keeps an included router as one): asked per method.
            for method in _METHOD_ORDER:
                if route.matches({**scope, "method": method})[0] is Match.FULL:
                    methods.add(method)
    return methods


async def _on_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail
    if not isinstance(detail, str):
        # A problem's detail is a string: structured detail (a dict, a list) is kept as JSON.
        detail = orjson.dumps(detail, default=str).decode() if detail else ""
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        # Starlette names only the methods of the first route that matched the path.
        allow = headers["Allow"] = allowed_methods(request.scope)
        detail = f"{clip(request.method, 16)} is not supported here; this path supports {allow}."
    return problem_response(Problem(exc.status_code, detail=detail, headers=headers))


def internal_error_response(
    exc: BaseException, method: str, path: str, request_id: str
) -> Response:
    """Log `exc` with its traceback; answer 500 with only a correlation id."""
    log.error(
        "unhandled %s on %s %s (request_id=%s)",
        type(exc).__name__,
        escape(method),
        escape(path),
        request_id,
        exc_info=exc,
    )
    return problem_response(
        Problem(
            500,
            "internal",
            UNEXPECTED,
            correlation_id=request_id,
        )
    )


async def _on_unexpected(request: Request, exc: Exception) -> Response:
    # Starlette's ServerErrorMiddleware calls this for anything unhandled; RequestGuard,
    # outside it, has put the request id in the state.
    if _too_late(request, exc):  # the guard says what happened
        return Response(status_code=500)
    return internal_error_response(
        exc, client_method(request.scope), request.scope.get("path", ""), _request_id(request)
    )


def _too_late(request: Request, exc: Exception) -> bool:
    """Whether the response had started before `exc` (no answer can be sent: the request
    guard says what happened); else tell the guard the app answers it, since Starlette
    raises it again afterwards."""
    exchange = request.scope.get(EXCHANGE_KEY)
    if exchange is None:
        return False
    if exchange.status:
        return True
    exchange.answered = exc
    return False


def _websocket_problem(exc: Exception) -> Problem:
    if isinstance(exc, Problem):
        return exc
    if isinstance(exc, PglayerError):
        return problem_for_database_error(exc)
    if isinstance(exc, StarletteHTTPException):
        return Problem(exc.status_code)
    return Problem(500, "internal")


# Starlette reads a frame's `text` or `bytes` by key, and `receive_json` parses it: a frame
# of the other type (its KeyError) or not JSON is the client's doing, not a bug of the app's.
_FRAME_READERS = frozenset({"receive_text", "receive_bytes", "receive_json"})


def frame_refusal(exc: Exception) -> tuple[int, str] | None:
    """The close code and reason for a WebSocket frame the handler's read refused: of the
    type not read (RFC 6455's 1003), or not JSON where JSON is read (1007); else None."""
    # RecursionError: JSON nested deeper than the decoder goes ("[" * 100000).
    if not isinstance(exc, KeyError | ValueError | RecursionError):
        return None
    tb, reader = exc.__traceback__, None
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name in _FRAME_READERS and code.co_filename.endswith(
            ("starlette/websockets.py", "starlette\\websockets.py")
        ):
            reader = tb
        tb = tb.tb_next
    if reader is None:
        return None
    if isinstance(exc, KeyError):
        return (1003, "unsupported_media_type") if reader.tb_next is None else None
    if reader.tb_frame.f_code.co_name == "receive_json":  # json.loads, or the bytes' UTF-8
        return 1007, "validation_error"
    return None


async def _close_websocket(websocket: WebSocket, exc: Exception) -> None:
    """A WebSocket's error: before the handshake is accepted, the problem as an HTTP
    answer (where the server can send one); after, the socket closes with a code that says
    whether to try again (1013), the server failed (1011) or the request did (1008)."""
    problem = _websocket_problem(exc)
    state = websocket.application_state
    closed = state == WebSocketState.DISCONNECTED  # its error came after (a failed COMMIT)
    status = problem.status
    if status >= 500 or closed:
        count = _SAID.allow((status, problem.code, type(exc), closed))
        if count is not None or status == 500:
            log.log(
                logging.ERROR if status == 500 or closed else logging.WARNING,
                "websocket %s -> %s, %s %s (%s)%s",
                escape(websocket.scope.get("path", "")),
                "already closed: lost" if closed else "closed",
                status,
                problem.code,
                type(exc).__name__,
                left_out(count or 0),
                exc_info=exc if status == 500 or closed else None,
            )
    if closed:
        return
    with contextlib.suppress(Exception):  # the client left meanwhile
        if state == WebSocketState.CONNECTING and "websocket.http.response" in (
            websocket.scope.get("extensions") or {}
        ):
            await websocket.send_denial_response(problem_response(problem))
        else:
            code = 1013 if status in (503, 504) else 1011 if status >= 500 else 1008
            await websocket.close(code=code, reason=problem.code)


def _http_only(handler: Handler) -> Handler:
    """`handler` for HTTP; a WebSocket's error closes it instead (`_close_websocket`)."""

    async def handle(conn: Any, exc: Exception) -> Response | None:
        if conn.scope["type"] == "websocket":
            await _close_websocket(conn, exc)
            return None
        return await handler(conn, exc)

    return handle


def _noting(own: Any) -> Any:
    """The app's own handler for `Exception`, telling the request guard that it answered
    (Starlette raises the error again after it: not to be taken for one after the answer)."""

    async def handle(request: Request, exc: Exception) -> Any:
        _too_late(request, exc)
        if inspect.iscoroutinefunction(own):
            return await own(request, exc)
        return await run_in_threadpool(own, request, exc)  # as Starlette runs a sync one

    handle.pglayer_noted = True  # type: ignore[attr-defined]
    return handle


def install_problem_handlers(app: FastAPI) -> None:
    """Register the handlers that turn every error into a problem response, each unless the
    app has its own for that class already."""
    handlers: dict[type[Exception], Handler] = {
        Problem: _on_problem,
        PglayerError: _on_pglayer_error,
        RequestValidationError: _on_validation_error,
        StarletteHTTPException: _on_http_exception,
        Exception: _on_unexpected,  # HTTP only: Starlette's ServerErrorMiddleware calls it
    }
    for cls, handler in handlers.items():
        own = app.exception_handlers.get(cls)
        if own in (None, *_FASTAPI_DEFAULTS):
            chosen: Any = handler if cls is Exception else _http_only(handler)
            app.add_exception_handler(cls, chosen)
        elif cls is Exception and not getattr(own, "pglayer_noted", False):
            app.add_exception_handler(cls, _noting(own))
    if not getattr(app.router.default, "pglayer", False):
        app.router.default = _websockets_not_found(app.router.default)


def _websockets_not_found(default: ASGIApp) -> ASGIApp:
    """The router's answer to a path no route takes: for a WebSocket handshake, a 404
    problem as for HTTP (Starlette closes it unaccepted, which uvicorn sends as a bare 403:
    a handshake at an HTTP route's path got that)."""

    async def not_found(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            raise StarletteHTTPException(404)  # to `_close_websocket`, as a route's would
        await default(scope, receive, send)

    not_found.pglayer = True  # type: ignore[attr-defined]
    return not_found
