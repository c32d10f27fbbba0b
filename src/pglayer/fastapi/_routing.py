"""`Route`: an `APIRoute` that hands `Db` parameters the app's `Database` directly, and
opens its connection parameters itself.

`Db` works with any route as a FastAPI dependency, which FastAPI solves on every request
(about 11 µs here, as much as the rest of pglayer's request path); a connection dependency
costs more (FastAPI wraps a generator dependency in contextlib and anyio layers: +25% of a
tutorial handler's instructions). On a `Route` the endpoint is wrapped once, at startup:
those parameters are dropped from what FastAPI sees, replaced by the `Request` (which
FastAPI passes for free), and the wrapper fills them in: the app's `Database`, and each
connection opened as its dependency would open it, after the body is validated. Use it per
router, `APIRouter(route_class=Route)`; `setup()` makes it the default for routes declared
on the app itself afterwards.

A `Route` with a JSON body also takes it only as `pglayer.fastapi._bodies` describes: plain
JSON, parsed strictly (415 or 422 otherwise), and at most a few unknown keys validated; and a
query parameter or header it takes one of must come once (`pglayer.fastapi._repeats`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, get_args, get_origin

from fastapi import Request, params
from fastapi.routing import APIRoute
from starlette.responses import Response

from pglayer._connection import Connection
from pglayer._database import Database
from pglayer.fastapi._bodies import json_body_handler, known_keys
from pglayer.fastapi._dependencies import STATE_KEY, Db, Taken, bound_database
from pglayer.fastapi._repeats import once_each_handler, single_valued
from pglayer.fastapi._transactional import validate_response

__all__ = ["Route", "with_database"]

_REQUEST = "pglayer_request_"


def with_database(endpoint: Callable[..., Any], *, connections: bool = True) -> Callable[..., Any]:
    """`endpoint` with its `Db` parameters filled from the app state, and (`connections`)
    its `WriteTransaction`, `WriteConnection`, `ReadConnection` and
    `transaction_dependency()` parameters opened here; or as it is."""
    if not inspect.iscoroutinefunction(endpoint):
        return endpoint  # FastAPI runs sync endpoints in a thread: keep its own path
    try:
        signature = inspect.signature(endpoint, eval_str=True)
    except NameError:  # a string annotation of a local name: as FastAPI takes it, then
        return endpoint
    params = signature.parameters.values()
    names = [p.name for p in params if p.annotation is Db]
    opened = {p.name: d for p in params if connections and (d := _opened(p.annotation))}
    if not names and not opened:
        return endpoint
    # FastAPI passes the request to one parameter only: the endpoint's own, if it has one.
    own = [
        p.name
        for p in params
        if isinstance(p.annotation, type) and issubclass(p.annotation, Request)
    ]
    key = own[0] if own else _REQUEST
    keep = bool(own)
    call = _opening(endpoint, opened) if opened else endpoint

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
        return await call(db, request, values) if opened else await endpoint(**values)

    drop = {*names, *opened}
    kept = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params if p.name not in drop]
    if not keep:
        kept.append(inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, annotation=Request))
    wrapper.__signature__ = signature.replace(parameters=kept)  # type: ignore[attr-defined]
    # For the lifespan's checks (a transaction that commits late, or two in one route).
    wrapper.pglayer_taken = tuple(Taken(d, name) for name, d in opened.items())  # type: ignore[attr-defined]
    return wrapper


def _opened(annotation: Any) -> Callable[..., Any] | None:
    """The pglayer connection dependency an `Annotated[Connection, Depends(...)]` declares,
    if `Route` may open it itself: FastAPI's solving costs every request a fifth of what
    it costs in all (contextlib, anyio, the dependency's own request parameter)."""
    if get_origin(annotation) is not Annotated:
        return None
    base, *extras = get_args(annotation)
    depends = [e for e in extras if isinstance(e, params.Depends)]
    if base is not Connection or len(depends) != 1 or depends[0].scope != "function":
        return None  # a late commit is the lifespan's to refuse, as FastAPI declares it
    dependency = depends[0].dependency
    return dependency if hasattr(dependency, "pglayer_opens") else None


def _opening(
    endpoint: Callable[..., Any], opened: dict[str, Callable[..., Any]]
) -> Callable[[Database, Request, dict[str, Any]], Coroutine[Any, Any, Any]]:
    """A call of `endpoint` with its connections opened around it, each as its dependency
    would open it (once for the parameters that share one, as FastAPI solves it once); a
    transaction's answer is checked against the response model before its COMMIT, as
    FastAPI checks it before a dependency's exit (a refused answer rolls back)."""
    shared: dict[Callable[..., Any], list[str]] = {}
    for name, dependency in opened.items():
        shared.setdefault(dependency, []).append(name)
    commits = any(getattr(d, "pglayer_commits", False) for d in shared)
    if len(opened) == 1:
        [(name, dependency)] = opened.items()

        async def one(db: Database, request: Request, values: dict[str, Any]) -> Any:
            async with dependency.pglayer_opens(db) as conn:  # type: ignore[attr-defined]
                values[name] = conn
                result = await endpoint(**values)
                if commits:
                    validate_response(request, result)
                return result

        return one

    async def several(db: Database, request: Request, values: dict[str, Any]) -> Any:
        async with contextlib.AsyncExitStack() as stack:
            for dependency, names in shared.items():
                opener = dependency.pglayer_opens  # type: ignore[attr-defined]
                conn = await stack.enter_async_context(opener(db))
                values.update(dict.fromkeys(names, conn))
            result = await endpoint(**values)
            if commits:
                validate_response(request, result)
            return result

    return several


class Route(APIRoute):
    """An `APIRoute` whose endpoint gets `Db` and its connections without FastAPI's
    dependency solving, and whose JSON body is parsed by pglayer's rules."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        wrapped = with_database(endpoint)
        super().__init__(path, wrapped, **kwargs)
        taken = {t.call for t in getattr(wrapped, "pglayer_taken", ())}
        if taken and _solved_elsewhere(self.dependant, taken):
            # Another of the route's dependencies takes the same one, which FastAPI solves
            # once for both (one transaction): left to FastAPI, as declared.
            super().__init__(path, with_database(endpoint, connections=False), **kwargs)

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


def _solved_elsewhere(dependant: Any, calls: set[Any]) -> bool:
    """Whether any dependency under `dependant` is one of `calls`."""
    return any(sub.call in calls or _solved_elsewhere(sub, calls) for sub in dependant.dependencies)
