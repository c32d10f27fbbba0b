"""A per-task deadline that bounds acquires, queries and retries together."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

__all__ = ["deadline", "remaining"]

_deadline: ContextVar[float | None] = ContextVar("pglayer_deadline", default=None)


@contextmanager
def deadline(seconds: float | None) -> Iterator[None]:
    """Bound the work inside to `seconds` from now (a tighter outer deadline still wins)."""
    if seconds is None:
        yield
        return
    at = time.monotonic() + seconds
    outer = _deadline.get()
    token = _deadline.set(at if outer is None else min(at, outer))
    try:
        yield
    finally:
        _deadline.reset(token)


def remaining() -> float | None:
    """Seconds left before the current deadline (may be negative), or None without one."""
    at = _deadline.get()
    return None if at is None else at - time.monotonic()
