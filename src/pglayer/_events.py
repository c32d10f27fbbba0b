"""Instrumentation hooks: the pool's events, for OpenTelemetry, logs or anything else.

A hook is any callable taking one event. Register it with `Database(hooks=[...])` or
`db.add_hook(...)`. Hooks run inline on the event loop, so they must be quick and must not
block; one that raises is logged and otherwise ignored, never failing a request::

    def to_otel(event: pglayer.Event) -> None:
        if isinstance(event, pglayer.QueryEvent):
            histogram.record(event.seconds, {"db.operation": event.operation})
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Literal

__all__ = ["Event", "Hook", "PoolEvent", "QueryEvent", "RetryEvent", "log_events"]

PoolEventKind = Literal[
    "acquired",
    "released",
    "acquire_timeout",
    "shed",
    "connection_opened",
    "connection_closed",
    "connection_lost",
    "connection_failed",
]


@dataclass(frozen=True, slots=True)
class PoolEvent:
    """Something the pool did. `seconds`: the wait (acquired) or the hold (released)."""

    pool: str
    kind: PoolEventKind
    seconds: float | None = None


@dataclass(frozen=True, slots=True)
class QueryEvent:
    """A statement finished. `statement` is the SQL text only, never parameter values."""

    pool: str
    statement: str
    seconds: float
    operation: str
    request_id: str
    error: str | None = None  # the pglayer error class name
    sqlstate: str | None = None


@dataclass(frozen=True, slots=True)
class RetryEvent:
    """A transient failure was retried (or, with `gave_up`, no longer)."""

    pool: str
    reason: str
    gave_up: bool = False


Event = PoolEvent | QueryEvent | RetryEvent
Hook = Callable[[Event], None]

_events_log = logging.getLogger("pglayer.events")


def log_events(event: Event) -> None:
    """A hook that logs every event at DEBUG on the `pglayer.events` logger."""
    if _events_log.isEnabledFor(logging.DEBUG):
        _events_log.debug(type(event).__name__, extra={"event": asdict(event)})
