"""Transactional routes: the whole handler is the transaction, replayed when it must be.

`@transactional()` runs a handler's database work in one transaction at the chosen isolation
(SERIALIZABLE by default) and, on a serialization failure or a deadlock (40001, 40P01) or a
connection lost before COMMIT was sent, runs the *whole handler* again, with jittered
backoff, until it commits or the request's deadline passes. So a plain read-modify-write
handler, written as a tutorial writes it, can neither oversell nor answer 503 for a conflict
it could have survived. The handler must therefore have no side effects outside the
database (no e-mails, no calls to other services): they would happen once per attempt.

    @app.post("/orders", status_code=201)
    @transactional()
    async def order(body: OrderIn, conn: Connection) -> OrderOut:
        stock = await conn.fetchval("SELECT stock FROM products WHERE id = $1", body.product_id)
        ...

The handler receives its connection in the parameter annotated `Connection`; FastAPI never
sees that parameter. COMMIT happens before the response is sent. The decorator goes under
the route's (as above): over it, FastAPI registers the handler first and refuses the
`Connection` parameter ("Invalid args for response field").
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.exceptions import ResponseValidationError
from starlette.responses import Response

from pglayer._connection import Connection, Isolation, check_transaction_options
from pglayer.fastapi._dependencies import bound_database

__all__ = ["transactional"]

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

_REQUEST = "pglayer_request__"
_DEFAULT_ATTEMPTS = 50  # the request's deadline is the real bound


def _connection_parameter(hints: dict[str, Any], handler: Callable[..., Any]) -> str:
    names = [name for name, hint in hints.items() if hint is Connection and name != "return"]
    if len(names) != 1:
        raise TypeError(
            f"@transactional handler {handler.__qualname__} needs exactly one parameter"
            " annotated `Connection`, plain (the decorator gives it its transaction), not"
            " `WriteTransaction` or another dependency"
        )
    return names[0]


def validate_response(request: Request, result: Any) -> None:
    """Check `result` against the route's response model, as FastAPI will after the handler
    returns: a check that runs after COMMIT would answer 500 with the change applied, so a
    handler that commits runs it first, inside its transaction."""
    field = getattr(request.scope.get("route"), "response_field", None)
    if field is None or isinstance(result, Response):  # a response is sent as it is
        return
    _, errors = field.validate(result, {}, loc=("response",))
    if errors:
        raise ResponseValidationError(errors=errors, body=result)


def transactional(
    *,
    isolation: Isolation = "serializable",
    lock_timeout: float | None = None,
    attempts: int = _DEFAULT_ATTEMPTS,
    bulkhead: str | None = None,
) -> Callable[[F], F]:
    """Run the handler in one transaction at `isolation`; replay it whole on conflicts.

    The handler takes its connection as the one parameter annotated `Connection` (FastAPI
    never sees it) and must have no side effects outside the database: on 40001, 40P01 or a
    connection lost before COMMIT it runs again, up to `attempts` times (50: the request's
    deadline is the real bound; `db.run_in_transaction` stops at `PGLAYER_RETRY_ATTEMPTS`,
    3), then answers 503 `busy`. COMMIT happens before the response is sent. `lock_timeout`
    bounds each lock wait (503 `busy`); `bulkhead` names the class of work it counts in.
    """
    check_transaction_options(isolation, lock_timeout, attempts)

    def decorate(handler: F) -> F:
        # Resolved here: FastAPI would evaluate string annotations in this module's globals.
        hints = typing.get_type_hints(handler, include_extras=True)
        conn_name = _connection_parameter(hints, handler)
        signature = inspect.signature(handler)
        visible = [
            p.replace(annotation=hints.get(p.name, p.annotation))
            for p in signature.parameters.values()
            if p.name != conn_name
        ]
        request = inspect.Parameter(_REQUEST, inspect.Parameter.KEYWORD_ONLY, annotation=Request)

        @functools.wraps(handler)
        async def endpoint(*args: Any, **kwargs: Any) -> Any:
            request: Request = kwargs.pop(_REQUEST)
            db = await bound_database(request)

            async def attempt(conn: Connection) -> Any:
                result = await handler(*args, **kwargs, **{conn_name: conn})
                validate_response(request, result)
                return result

            return await db.run_in_transaction(
                attempt,
                isolation=isolation,
                lock_timeout=lock_timeout,
                attempts=attempts,
                bulkhead=bulkhead,
            )

        endpoint.pglayer_transactional = True  # type: ignore[attr-defined]
        # FastAPI reads the signature: without the connection, with the request it needs.
        endpoint.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[*visible, request],
            return_annotation=hints.get("return", signature.return_annotation),
        )
        return endpoint  # type: ignore[return-value]

    return decorate
