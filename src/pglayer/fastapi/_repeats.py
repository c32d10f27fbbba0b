"""A query parameter or header a route takes one value of, sent twice, is a 422.

FastAPI keeps the last of `?limit=0&limit=3` and the first of two `Idempotency-Key` headers,
and answers as if the other had not been sent: two clients (or a proxy and a client) that
disagree on the value get one of them silently. On a `Route`, a scalar query parameter or
header given more than once is refused, naming it; list-typed ones may repeat as before.
Only a query string with `&` is parsed again, and headers are scanned only on routes that
declare one, so other requests pay nothing.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable, Coroutine, Sequence, Set
from typing import Any
from urllib.parse import parse_qsl

from fastapi import Request
from fastapi.dependencies.models import Dependant
from starlette.responses import Response

from pglayer.fastapi._problems import Problem, field_error

__all__ = ["once_each_handler", "single_valued"]

Handler = Callable[[Request], Coroutine[Any, Any, Response]]


def single_valued(dependant: Dependant) -> tuple[frozenset[str], frozenset[bytes]]:
    """The scalar query parameters and headers (lower-cased) of a route and its dependencies."""
    queries: set[str] = set()
    headers: set[bytes] = set()
    pending = [dependant]
    while pending:
        current = pending.pop()
        pending.extend(current.dependencies)
        for field in current.query_params:
            if not _many(field.field_info.annotation):
                queries.add(field.alias)
        for field in current.header_params:
            if not _many(field.field_info.annotation):
                explicit = getattr(field.field_info, "alias", None)
                convert = getattr(field.field_info, "convert_underscores", True)
                name = explicit or (field.alias.replace("_", "-") if convert else field.alias)
                headers.add(name.lower().encode("latin-1"))
    return frozenset(queries), frozenset(headers)


def _many(annotation: Any) -> bool:
    """Whether a parameter annotated `annotation` takes several values (`list[str] | None`)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return any(_many(arg) for arg in typing.get_args(annotation))
    kind = origin or annotation
    return isinstance(kind, type) and (
        issubclass(kind, Set) or (issubclass(kind, Sequence) and not issubclass(kind, str | bytes))
    )


def once_each_handler(
    handler: Handler, queries: frozenset[str], headers: frozenset[bytes]
) -> Handler:
    """`handler` behind the check above."""

    async def checked(request: Request) -> Response:
        scope = request.scope
        query = scope["query_string"]
        if queries and b"&" in query:
            names = [name for name, _ in parse_qsl(query.decode("latin-1"), True)]
            for name in queries:
                if names.count(name) > 1:
                    raise _repeated("query", name)
        if headers:
            seen: set[bytes] = set()
            for name, _ in scope["headers"]:
                if name in headers:
                    if name in seen:
                        raise _repeated("header", _title(name))
                    seen.add(name)
        return await handler(request)

    return checked


def _title(name: bytes) -> str:
    return "-".join(part.capitalize() for part in name.decode("latin-1").split("-"))


def _repeated(where: str, name: str) -> Problem:
    return Problem(
        422,
        "validation_error",
        f"The {where} `{name}` was given more than once; send it once.",
        errors=[field_error([where, name], "given more than once")],
    )
