"""Per-task context that logs and metrics carry: the request id and the operation name."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

__all__ = [
    "RequestWrites",
    "current_operation",
    "current_request_id",
    "enter",
    "leave",
    "mark_wrote",
    "operation",
    "reads_need_primary",
    "request_id",
    "set_operation",
    "track_writes",
    "untrack_writes",
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


class RequestWrites:
    """Per request: whether it committed a write, and whether its client wrote recently."""

    __slots__ = ("recent", "wrote")

    def __init__(self, *, recent: bool = False) -> None:
        self.wrote = False
        self.recent = recent

    @property
    def needs_primary(self) -> bool:
        return self.wrote or self.recent


_writes: ContextVar[RequestWrites | None] = ContextVar("pglayer_writes", default=None)


def track_writes(writes: RequestWrites) -> Any:
    """Track the writes of the current task in `writes`; returns a token for `untrack`."""
    return _writes.set(writes)


def untrack_writes(token: Any) -> None:
    _writes.reset(token)


def mark_wrote() -> None:
    """Record that this task committed a write: its later reads go to the primary."""
    writes = _writes.get()
    if writes is not None:
        writes.wrote = True


def reads_need_primary() -> bool:
    """True when this task (or its client, recently) wrote: replicas may not have it yet."""
    writes = _writes.get()
    return writes is not None and writes.needs_primary
