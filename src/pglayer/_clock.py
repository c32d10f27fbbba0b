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
import bisect
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
_LAG_KEPT = 4096  # ...the last this many

Tick = Callable[[float], bool]  # gets `time.monotonic()`; returns whether it has work left


class Clock:
    """Calls every subscriber each `TICK` while any of them reports work in flight."""

    __slots__ = ("_base", "_due", "_handle", "_loop", "_seen", "_subscribers", "_sums")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._handle: asyncio.TimerHandle | None = None
        self._subscribers: list[Tick] = []
        self._due = 0.0  # when the armed tick should run (0: armed by `wake`, not timed)
        # When each late tick ran, and the sum of the lateness up to it: the loop's lateness
        # since a moment is the newest sum less the last one before it. The worst single
        # lateness said 0.9 s of a statement's 4.7 s while the loop stalled again and again,
        # and the slow-query line blamed the database.
        self._seen: list[float] = []
        self._sums: list[float] = []
        self._base = 0.0  # the sum before the first kept

    def lag(self, since: float) -> float:
        """How late the tick ran in all since `since` (a lower bound on how long the loop
        kept work waiting: seen only while the tick runs; the last `_LAG_KEPT` late ticks)."""
        seen = self._seen
        if not seen or seen[-1] < since:
            return 0.0
        first = bisect.bisect_left(seen, since)
        return self._sums[-1] - (self._sums[first - 1] if first else self._base)

    def _note_lateness(self, now: float, late: float) -> None:
        seen, sums = self._seen, self._sums
        if len(seen) >= _LAG_KEPT:
            half = _LAG_KEPT // 2
            self._base = sums[half - 1]
            del seen[:half], sums[:half]
        seen.append(now)
        sums.append((sums[-1] if sums else self._base) + late)

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
