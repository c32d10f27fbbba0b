"""`Clock`: one coarse periodic tick per event loop that drives pglayer's deadlines.

A loop timer armed and cancelled per query or per request costs about 3 µs on uvloop, more
than the work it guards when that work finishes in time, which it nearly always does. So
deadlines are plain numbers written where the work starts (a pooled connection's query
deadline, a waiter's acquire deadline, a request's start), and one tick every `TICK`
seconds looks at the few that can have passed. The tick runs only while some subscriber
has work in flight; a subscriber that gets some calls `wake()`, which is a no-op while the
tick is already running.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["TICK", "Clock", "clock", "current_task", "for_loop", "loop_lag"]

try:  # the C function itself: on 3.11 `asyncio.current_task` adds a Python frame
    from _asyncio import current_task  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover
    from asyncio import current_task

log = logging.getLogger("pglayer")

TICK = 0.01  # seconds; deadlines fire at most this late
_LATE = 0.001  # a tick later than this is noted as the loop's lag...
_LAG_KEPT = 60.0  # ...for this long (seconds)

Tick = Callable[[float], bool]  # gets `time.monotonic()`; returns whether it has work left


class Clock:
    """Calls every subscriber each `TICK` while any of them reports work in flight."""

    __slots__ = ("_due", "_handle", "_lateness", "_loop", "_subscribers")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._handle: asyncio.TimerHandle | None = None
        self._subscribers: list[Tick] = []
        self._due = 0.0  # when the armed tick should run (0: armed by `wake`, not timed)
        # (when seen, how late) of the ticks that ran late, each later one less late than
        # the one before: the worst since any moment is then the first seen after it. A
        # single "worst of the last second" hid a lag behind a greater one just before.
        self._lateness: list[tuple[float, float]] = []

    def lag(self, since: float) -> float:
        """How late the tick ran at worst since `since` (a lower bound on the loop's lag:
        seen only while the tick runs; kept for `_LAG_KEPT` seconds)."""
        for seen, late in self._lateness:
            if seen >= since:
                return late
        return 0.0

    def _note_lateness(self, now: float, late: float) -> None:
        lateness = self._lateness
        while lateness and lateness[-1][1] <= late:
            lateness.pop()
        lateness.append((now, late))
        if lateness[0][0] < now - _LAG_KEPT:
            del lateness[0]

    def subscribe(self, tick: Tick) -> None:
        self._subscribers.append(tick)

    def unsubscribe(self, tick: Tick) -> None:
        if tick in self._subscribers:
            self._subscribers.remove(tick)

    def wake(self) -> None:
        """Make sure the tick runs (cheap when it already does)."""
        if self._handle is None:
            self._due = 0.0  # not timed: a clock read here would be one more per request
            self._handle = self._loop.call_later(TICK, self._run)

    def _run(self) -> None:
        now = time.monotonic()
        if self._due and now - self._due >= _LATE:
            self._note_lateness(now, now - self._due)
        busy = False
        for tick in list(self._subscribers):
            try:
                busy = tick(now) or busy
            except Exception:
                # A broken subscriber must not stop the deadlines of the others.
                log.exception("pglayer clock subscriber %r failed", tick)
        if busy:
            self._due = now + TICK
            self._handle = self._loop.call_later(TICK, self._run)
        else:
            self._handle = None


T = TypeVar("T")


def for_loop(
    registry: dict[asyncio.AbstractEventLoop, T],
    loop: asyncio.AbstractEventLoop,
    make: Callable[[asyncio.AbstractEventLoop], T],
) -> T:
    """`registry`'s object for `loop`, made on first use. Entries of closed loops are dropped
    then: each object holds its loop, so a weak mapping would keep every loop (and what its
    callbacks hold: apps, pools) for ever, one per test of a suite."""
    found = registry.get(loop)
    if found is None:
        for closed in [other for other in registry if other.is_closed()]:
            del registry[closed]
        found = registry[loop] = make(loop)
    return found


_clocks: dict[asyncio.AbstractEventLoop, Clock] = {}


def clock() -> Clock:
    """The clock of the running event loop."""
    loop = asyncio.get_running_loop()
    found = _clocks.get(loop)
    return found if found is not None else for_loop(_clocks, loop, Clock)


def loop_lag(since: float) -> float:
    """The running loop's lag since `since` by its clock (see `Clock.lag`); 0 outside one."""
    try:
        found = _clocks.get(asyncio.get_running_loop())
    except RuntimeError:  # called from synchronous code (a SQLAlchemy engine's events)
        return 0.0
    return 0.0 if found is None else found.lag(since)
