"""`Route`: an `APIRoute` that hands `Db` parameters the app's `Database` directly.

`Db` works with any route as a FastAPI dependency, which FastAPI solves on every request
(about 11 µs here, as much as the rest of pglayer's request path). On a `Route` the
endpoint is wrapped once, at startup: its `Db` parameters are dropped from what FastAPI
sees, replaced by the `Request` (which FastAPI passes for free), and the wrapper fills them
in from the app's state. Use it per router, `APIRouter(route_class=Route)`; `setup()` makes
it the default for routes declared on the app itself afterwards.

A `Route` with a JSON body also takes it only as `pglayer.fastapi._bodies` describes: plain
JSON, parsed strictly (415 or 422 otherwise), and at most a few unknown keys validated; and a
query parameter or header it takes one of must come once (`pglayer.fastapi._repeats`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, params
from fastapi.routing import APIRoute
from starlette.responses import Response

from pglayer.fastapi._bodies import json_body_handler, known_keys
from pglayer.fastapi._dependencies import STATE_KEY, Db, bound_database
from pglayer.fastapi._repeats import once_each_handler, single_valued

__all__ = ["Route", "with_database"]

_REQUEST = "pglayer_request_"


def with_database(endpoint: Callable[..., Any]) -> Callable[..., Any]:
    """`endpoint` with its `Db` parameters filled from the app state, or as it is."""
    if not inspect.iscoroutinefunction(endpoint):
        return endpoint  # FastAPI runs sync endpoints in a thread: keep its own path
    signature = inspect.signature(endpoint, eval_str=True)
    params = signature.parameters.values()
    names = [p.name for p in params if p.annotation is Db]
    if not names:
        return endpoint
    # FastAPI passes the request to one parameter only: the endpoint's own, if it has one.
    own = [
        p.name
        for p in params
        if isinstance(p.annotation, type) and issubclass(p.annotation, Request)
    ]
    key = own[0] if own else _REQUEST
    keep = bool(own)

    @functools.wraps(endpoint)
    async def wrapper(**values: Any) -> Any:
        request: Request = values[key] if keep else values.pop(key)
        app = request.app
        if app.dependency_overrides:  # tests: honoured as FastAPI would
            db = await bound_database(request)
        else:
            db = getattr(app.state, STATE_KEY, None) or await bound_database(request)
        for name in names:
            values[name] = db
        return await endpoint(**values)

    kept = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params if p.name not in names]
    if not keep:
        kept.append(inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, annotation=Request))
    wrapper.__signature__ = signature.replace(parameters=kept)  # type: ignore[attr-defined]
    return wrapper


class Route(APIRoute):
    """An `APIRoute` whose endpoint gets `Db` without dependency solving, and whose JSON
    body is parsed by pglayer's rules."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(path, with_database(endpoint), **kwargs)

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        field = self.body_field
        if field is not None and not isinstance(field.field_info, params.Form):
            known = None if self._embed_body_fields else known_keys(field)
            handler = json_body_handler(handler, known)  # routes without a body pay nothing
        queries, headers = single_valued(self.dependant)
        if queries or headers:
            handler = once_each_handler(handler, queries, headers)
        return handler
