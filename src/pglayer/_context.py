"""The context of the work in progress: request id, operation, deadline, and writes made.

All of it lives in one `RequestContext` behind one context variable: a request sets it
once, and a query reads it once.
"""

from __future__ import annotations

import itertools
import os
import re
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from contextlib import contextmanager
from contextvars import ContextVar, Token
from typing import Any

__all__ = [
    "FRONT_DOOR_KEY",
    "MAX_TIMEOUT",
    "RequestContext",
    "Writes",
    "client_request_id",
    "current",
    "current_operation",
    "current_request_id",
    "enter",
    "leave",
    "mark_wrote",
    "new_request_id",
    "operation",
    "reads_need_primary",
    "request_id",
    "set_operation",
]

MAX_TIMEOUT = 1e9  # seconds (31 years): past it a deadline overflows the clock's float

# The app.state attribute where the request guard offers early refusals to the HTTP server
# (`pglayer._http`): the two meet there without importing each other.
FRONT_DOOR_KEY = "pglayer_front_door"

# A client's X-Request-ID is kept when it looks like an id (it is logged and echoed).
VALID_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
# Request ids made here: unique per process (a random prefix) and cheap (a counter).
ID_PREFIX = os.urandom(8).hex()
id_counter = itertools.count(1)


def new_request_id() -> str:
    """A request id for a request that brought none (or an invalid one)."""
    return f"{ID_PREFIX}{next(id_counter):010x}"


def client_request_id(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The client's `X-Request-ID` among `headers` (lower-case names), if it is valid."""
    for name, value in headers:
        if name == b"x-request-id" and VALID_REQUEST_ID.fullmatch(value):
            return value.decode("ascii")
    return None


class Writes:
    """Whether a request committed a write, and whether its client wrote recently."""

    __slots__ = ("recent", "wrote")

    def __init__(self, *, recent: bool = False) -> None:
        self.wrote = False
        self.recent = recent


class RequestContext:
    """One unit of work: its id, deadline (`time.monotonic()`), operation and writes.

    `operation` is a fixed name, or None to use the route template of `scope` (known only
    after routing, so it is read when a query finishes).
    """

    __slots__ = ("deadline", "operation", "request_id", "scope", "writes")

    def __init__(
        self,
        request_id: str = "-",
        deadline: float | None = None,
        operation: str | Callable[[], str] | None = None,
        scope: MutableMapping[str, Any] | None = None,
        writes: Writes | None = None,
    ) -> None:
        self.request_id = request_id
        self.deadline = deadline
        self.operation = operation
        self.scope = scope
        self.writes = writes

    def derive(self, **changes: Any) -> RequestContext:
        """A copy with `changes`; the writes record stays shared with this one."""
        values = {name: getattr(self, name) for name in self.__slots__}
        values.update(changes)
        request_id = values.pop("request_id")
        return RequestContext(request_id, **values)

    def operation_name(self) -> str:
        name = self.operation
        if name is None:
            return (None if self.scope is None else route_path(self.scope)) or "-"
        return name if isinstance(name, str) else name()


def route_path(scope: MutableMapping[str, Any]) -> str | None:
    """The template of the route `scope` was routed to, prefixes included (None before)."""
    # FastAPI's routers, included lazily: `route` is the router's own (no prefix); the route
    # as included, with the prefixes it was included under, is FastAPI's effective route.
    included = scope.get("fastapi")
    effective = included.get("effective_route_context") if included else None
    path = getattr(effective, "path_format", None) or getattr(scope.get("route"), "path", None)
    if path is None and "endpoint" in scope:
        path = _plain_route_path(scope)
    if path and "app_root_path" in scope:
        # Routed inside a mounted app (Starlette's `Mount` sets the outermost root path):
        # its routes are relative to where it is mounted.
        path = scope["root_path"][len(scope["app_root_path"]) :] + path
    return path


# Per app: the templates of the routes that only Starlette routes (its own `Route`s, as
# FastAPI's /docs and /openapi.json are, and its `Mount`s), by endpoint, with the count of
# routes they were read from; those routes leave no `route` in the scope, only the endpoint.
_plain_templates: weakref.WeakKeyDictionary[Any, tuple[int, dict[int, str]]] = (
    weakref.WeakKeyDictionary()
)


def _plain_route_path(scope: MutableMapping[str, Any]) -> str | None:
    """The template of the plain Starlette route or mount `scope` was routed to, if any."""
    app = scope.get("app")
    routes = getattr(getattr(app, "router", None), "routes", None)
    if routes is None:
        return None
    count, templates = _plain_templates.get(app) or (-1, {})
    if count != len(routes):
        templates = _templates(routes)
        _plain_templates[app] = (len(routes), templates)
    return templates.get(id(scope["endpoint"]))


def _templates(routes: Iterable[Any]) -> dict[int, str]:
    """Each endpoint's template, for the endpoints that only one route has."""
    found: dict[int, list[str]] = {}
    for route in routes:
        endpoint = getattr(route, "app", None) if hasattr(route, "routes") else None
        if endpoint is not None:  # a Mount: what it matched is the mounted app
            found.setdefault(id(endpoint), []).append("/{path:path}")
        elif (endpoint := getattr(route, "endpoint", None)) is not None:
            found.setdefault(id(endpoint), []).append(str(getattr(route, "path", "")))
    return {key: paths[0] for key, paths in found.items() if len(paths) == 1}


_current: ContextVar[RequestContext | None] = ContextVar("pglayer_context", default=None)
_OUTSIDE = RequestContext()


# The context of the running task, or None outside any request or block (the variable's own
# method: every statement asks).
current: Callable[[], RequestContext | None] = _current.get


# Make a context current for this task, and undo it with the token (the per-request path;
# the variable's own methods, so no Python frame is added).
enter: Callable[[RequestContext], Token[RequestContext | None]] = _current.set
leave: Callable[[Token[RequestContext | None]], None] = _current.reset


@contextmanager
def _changed(**changes: Any) -> Iterator[RequestContext]:
    ctx = (_current.get() or _OUTSIDE).derive(**changes)
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)


def current_request_id() -> str:
    """The id of the request being handled in this task (`-` outside a request)."""
    ctx = _current.get()
    return "-" if ctx is None else ctx.request_id


def current_operation() -> str:
    """The operation queries are attributed to: a route template, a name, or `-`."""
    ctx = _current.get()
    return "-" if ctx is None else ctx.operation_name()


@contextmanager
def request_id(value: str) -> Iterator[None]:
    """Attribute everything logged in this block to request `value`."""
    with _changed(request_id=value):
        yield


@contextmanager
def operation(name: str | Callable[[], str]) -> Iterator[None]:
    """Attribute the queries of this block to `name` in metrics and the slow-query log.

    Keep names few and fixed (`"nightly-report"`), never built from data: each is a label.
    """
    with _changed(operation=name):
        yield


def set_operation(name: str | Callable[[], str]) -> None:
    """Like `operation()`, for the rest of the current task."""
    _current.set((_current.get() or _OUTSIDE).derive(operation=name))


@contextmanager
def bounded(seconds: float | None) -> Iterator[None]:
    """Bound the work inside to `seconds` from now (a tighter outer deadline still wins)."""
    if seconds is None:
        yield
        return
    if not 0 <= seconds <= MAX_TIMEOUT:  # NaN too, which `min` would have taken for the deadline
        raise ValueError(f"a deadline is seconds from 0 up, not {seconds!r}")
    at = time.monotonic() + seconds
    outer = _current.get()
    if outer is not None and outer.deadline is not None:
        at = min(at, outer.deadline)
    with _changed(deadline=at):
        yield


def remaining() -> float | None:
    """Seconds left before the current deadline (may be negative), or None without one."""
    ctx = _current.get()
    if ctx is None or ctx.deadline is None:
        return None
    return ctx.deadline - time.monotonic()


def mark_wrote() -> None:
    """Record that this task wrote: its later reads (and its client's) go to the primary."""
    ctx = _current.get()
    if ctx is not None and ctx.writes is not None:
        ctx.writes.wrote = True


def reads_need_primary() -> bool:
    """True when this task (or its client, recently) wrote: replicas may not have it yet."""
    ctx = _current.get()
    if ctx is None or ctx.writes is None:
        return False
    return ctx.writes.wrote or ctx.writes.recent
