"""Binding a `Database` to an app: open on startup, close on shutdown."""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.dependencies.utils import get_parameterless_sub_dependant
from fastapi.routing import APIRoute
from starlette.routing import Mount
from starlette.types import ASGIApp

from pglayer._database import Database
from pglayer._errors import ConfigurationError
from pglayer._gc import tune_gc as _tune_gc
from pglayer._logs import configure_logging
from pglayer._settings import ServerSettings, misspelt_settings
from pglayer.fastapi._dependencies import STATE_KEY, dependency_name, transactions
from pglayer.fastapi._middleware import RequestGuard
from pglayer.fastapi._openapi import complete_openapi
from pglayer.fastapi._problems import install_problem_handlers
from pglayer.fastapi._routing import Route

__all__ = ["database_lifespan", "setup", "wrap_lifespan"]

Lifespan = Callable[[Any], AbstractAsyncContextManager[Any]]
log = logging.getLogger("pglayer")


def database_lifespan(
    db: Database, inner: Lifespan | None = None, *, tune_gc: bool = False
) -> Lifespan:
    """A lifespan that opens `db`, runs the app's own `inner` lifespan, then closes `db`."""

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[Any]:
        _warn_plain_routes(app)
        _refuse_late_commits(app)
        _refuse_split_transactions(app)
        async with _held(db):
            if tune_gc:
                _tune_gc()
            if inner is None:
                _quiet_native_telemetry(app)
                yield None
            else:
                async with inner(app) as state:
                    _quiet_native_telemetry(app)  # after the app's own: it may configure one
                    yield state

    return lifespan


_OFF = {"tracing": False, "metrics": False, "logs": False}


def _quiet_native_telemetry(app: Any) -> None:
    """FastAPI (0.165) asks on every request whether an OpenTelemetry provider is
    configured: three provider lookups, ~20 Python calls, 5-10% of a cheap request's CPU.
    With none configured once the app has started, it is told not to ask again (OpenTelemetry
    configured later is not seen: configure it before, as `opentelemetry-instrument` does)."""
    native = getattr(app, "_native_telemetry", None)
    config = getattr(native, "config", None)
    if native is None or not isinstance(config, dict):
        return  # another FastAPI, or not FastAPI
    try:
        if native.enabled():
            return
        app._native_telemetry = type(native)({**config, **_OFF})
    except Exception:  # an optimisation: never a reason not to start
        log.debug("FastAPI's telemetry left as it is", exc_info=True)


# The lifespans running on each Database, and whether they opened it: apps that share one
# keep it open until the last of them ends; one opened by its owner is its owner's to close.
_holders: weakref.WeakKeyDictionary[Database, list[Any]] = weakref.WeakKeyDictionary()


@asynccontextmanager
async def _held(db: Database) -> AsyncIterator[None]:
    held = _holders.setdefault(db, [0, False])
    if held[0] == 0:
        held[1] = not db.is_open
    await db.open()
    held[0] += 1
    try:
        yield
    finally:
        held[0] -= 1
        if held[0] == 0 and held[1]:
            await db.close()


def _routes(
    routes: Iterable[Any], prefix: str = "", outer: Sequence[Any] = ()
) -> Iterator[tuple[str, Any, Sequence[Any]]]:
    """Every route with its full path and the dependencies of the routers it was included
    by (`include_router(..., dependencies=...)`), through included routers and the apps
    mounted in it (whose own lifespans Starlette never runs)."""
    for route in routes:
        included = getattr(route, "original_router", None)  # FastAPI includes routers lazily
        if included is not None:
            context = route.include_context
            yield from _routes(
                included.routes, prefix + context.prefix, [*outer, *context.dependencies]
            )
        elif isinstance(route, Mount):
            yield from _routes(getattr(route.app, "routes", ()), prefix + route.path)
        else:
            yield prefix + getattr(route, "path", ""), route, outer


def _warn_plain_routes(app: Any) -> None:
    """Say which routes are FastAPI's own, not pglayer's `Route`: declared before `setup()`,
    or on an `APIRouter` without `route_class=Route`, they skip its body checks."""
    plain = [
        path
        for path, route, _ in _routes(getattr(app, "routes", ()))
        if type(route) is APIRoute and route.body_field is not None
    ]
    if plain:
        log.warning(
            "%d route(s) with a body are FastAPI's APIRoute, not pglayer's Route, so"
            " pglayer's JSON checks (415, duplicate keys, strict parsing) skip them: %s;"
            " declare them after setup(), or on APIRouter(route_class=Route)",
            len(plain),
            ", ".join(sorted(set(plain))[:5]),
        )


def _refuse_late_commits(app: Any) -> None:
    """Refuse to start an app whose routes would commit after their response is sent."""
    late = sorted(set(_late_commits(app)))
    if late:
        raise ConfigurationError(
            f"{len(late)} route(s) take a transaction_dependency() without"
            f' scope="function", so they would commit after the response is sent: '
            f"{', '.join(late[:5])}; declare it as"
            ' Depends(transaction_dependency(...), scope="function")'
        )


def _late_commits(app: Any) -> Iterator[str]:
    """Transaction dependencies without `scope="function"`: they commit after the response."""
    for path, _, routers, dependant in _dependants(app):
        late = [s for s in transactions(routers) if s.scope != "function"]
        yield from (f"{path} ({dependency_name(s)}, of its router)" for s in late)
        late = [s for s in transactions(dependant) if s.scope != "function"]
        yield from (f"{path} ({dependency_name(s)})" for s in late)


def _refuse_split_transactions(app: Any) -> None:
    """Refuse to start an app with a route whose database work would not be one transaction:
    two transaction dependencies (each commits on its own, so one can fail with the other
    applied), or one under `@transactional` (it commits once, however often it replays)."""
    two, replayed = [], []
    for path, route, routers, dependant in _dependants(app):
        found = {
            sub.call: dependency_name(sub)
            for sub in (*transactions(routers), *transactions(dependant))
        }
        names = ", ".join(found.values())
        if getattr(getattr(route, "endpoint", None), "pglayer_transactional", False) and found:
            replayed.append(f"{path} ({names})")
        elif len(found) > 1:
            two.append(f"{path} ({names})")
    if replayed:
        raise ConfigurationError(
            "@transactional replays the handler in its own transaction, but a transaction"
            " dependency commits once, with every attempt's writes:"
            f" {', '.join(sorted(replayed)[:5])}"
        )
    if two:
        raise ConfigurationError(
            "route(s) take two transactions that commit separately (one can fail with the"
            " other applied); use one (with SQLAlchemy, `await session.connection()` runs"
            f" SQL in the session's): {', '.join(sorted(two)[:5])}"
        )


def _dependants(app: Any) -> Iterator[tuple[str, Any, Dependant, Dependant]]:
    """Each route's path, the route, its routers' dependencies and its own dependant."""
    for path, route, outer in _routes(getattr(app, "routes", ())):
        dependant = getattr(route, "dependant", None)
        if dependant is None:
            continue
        routers = Dependant(
            dependencies=[get_parameterless_sub_dependant(depends=d, path=path) for d in outer]
        )
        yield path, route, routers, dependant


def wrap_lifespan(app: FastAPI, *, on_shutdown: Callable[[], Awaitable[None]]) -> None:
    """Run `on_shutdown` after the app's current lifespan has ended."""
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app_: Any) -> AsyncIterator[Any]:
        try:
            async with inner(app_) as state:
                yield state
        finally:
            await on_shutdown()

    app.router.lifespan_context = lifespan


@functools.cache  # once per process, however many apps it builds
def _warn_misspelt_settings() -> None:
    for message in misspelt_settings():
        log.warning(message)


def setup(
    app: FastAPI,
    db: Database,
    *,
    max_body_size: int | None = None,
    request_timeout: float | None = 30.0,
    access_log: bool | None = None,
    tune_gc: bool | None = None,
    shed_exempt: tuple[str, ...] = ("/health/", "/metrics"),
    server: ServerSettings | None = None,
) -> None:
    """Bind `db` to `app`: lifespan (around the app's own), problem responses, request guard,
    and the OpenAPI document completed with what these answer (`pglayer.fastapi.openapi`).

    What is not given comes from `server` (default: `ServerSettings()`, the `PGLAYER_*`
    environment): `max_body_size`, `access_log`, `tune_gc`; and with `log_format` set
    (`pglayer serve`: text), logging is configured here, in every worker process.

    `tune_gc` (default: `PGLAYER_TUNE_GC`, on under `pglayer serve`), once per process after
    startup, moves everything alive (modules, the app, its schemas) out of the garbage
    collector's reach and collects the young generation every 200,000 allocations instead
    of 700: its collections then cost a few µs per request instead of ~90 at 223 concurrent
    requests (see `pglayer._gc`). It affects the whole process.
    """
    if getattr(app.state, STATE_KEY, None) is not None:
        raise ConfigurationError("setup() was already called for this app: call it once")
    server = server if server is not None else ServerSettings()
    if server.log_format is not None:
        configure_logging(format=server.log_format, level=server.log_level)
    _warn_misspelt_settings()
    max_body_size = server.max_body_size if max_body_size is None else max_body_size
    access_log = server.access_log if access_log is None else access_log
    setattr(app.state, STATE_KEY, db)
    app.router.lifespan_context = database_lifespan(
        db,
        app.router.lifespan_context,
        tune_gc=server.tune_gc if tune_gc is None else tune_gc,
    )
    if app.router.route_class is APIRoute:
        app.router.route_class = Route  # `Db` without dependency solving, from here on
    install_problem_handlers(app)
    complete_openapi(app, shed_exempt=shed_exempt)
    build = app.build_middleware_stack

    def build_with_guard() -> ASGIApp:
        # Outside every other layer (Starlette's and FastAPI's own): a refusal under a flood
        # then costs the least, and every answer, errors included, carries the request id.
        return RequestGuard(
            build(),
            max_body_size=max_body_size,
            request_timeout=request_timeout,
            access_log=access_log,
            database=db,
            shed_exempt=shed_exempt,
            app_state=app.state,
            router=app.router,
        )

    app.build_middleware_stack = build_with_guard  # type: ignore[method-assign]
