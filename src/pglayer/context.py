"""Per-task context that logs and metrics carry: the request id and the operation name."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

__all__ = [
    "current_operation",
    "current_request_id",
    "enter",
    "leave",
    "operation",
    "request_id",
    "set_operation",
]

_request_id: ContextVar[str] = ContextVar("pglayer_request_id", default="-")
# A name, or a function giving one when a query finishes: a web request's route is only
# known after routing, which happens after the middleware that sets this.
_operation: ContextVar[str | Callable[[], str]] = ContextVar("pglayer_operation", default="-")


def current_request_id() -> str:
    """The id of the request being handled in this task (`-` outside a request)."""
    return _request_id.get()


def current_operation() -> str:
    """The operation queries are attributed to: a route template, a name, or `-`."""
    value = _operation.get()
    return value if isinstance(value, str) else value()


@contextmanager
def request_id(value: str) -> Iterator[None]:
    """Attribute everything logged in this block to request `value`."""
    token = _request_id.set(value)
    try:
        yield
    finally:
        _request_id.reset(token)


@contextmanager
def operation(name: str | Callable[[], str]) -> Iterator[None]:
    """Attribute the queries of this block to `name` in metrics and the slow-query log.

    Keep names few and fixed (`"nightly-report"`), never built from data: each is a label.
    """
    token = _operation.set(name)
    try:
        yield
    finally:
        _operation.reset(token)


def set_operation(name: str | Callable[[], str]) -> None:
    """Like `operation()`, for the rest of the current task; a callable is asked lazily."""
    _operation.set(name)


def enter(request_id_value: str, operation_name: str | Callable[[], str]) -> tuple[Any, Any]:
    """Set both for the current task; undo with `leave()` (the per-request fast path)."""
    return _request_id.set(request_id_value), _operation.set(operation_name)


def leave(tokens: tuple[Any, Any]) -> None:
    _request_id.reset(tokens[0])
    _operation.reset(tokens[1])
