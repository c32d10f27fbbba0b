"""`Pool`: asyncpg connections to one server behind one waiter queue.

The queue owns fairness, the bound on waiting and the acquire deadline, as psycopg_pool's
does: a connection given back goes straight to the oldest waiter, never to whoever asks
next, and nobody skips the queue while it is not empty. The pool counts its connections
instead of scanning them, and a release is a plain function call unless the connection
needs a rollback (then it is reset in the background and rejoins the pool afterwards).

Deadlines (a waiter's, a running query's) are numbers that `Clock` checks every tick, so
the common case (a free connection, a query that answers in time) arms no timer at all.

Work is classed into bulkheads (`Lane`: reads, writes, or any name the caller gives), each
with a cap on the connections it may hold at once, so writes stuck behind a lock cannot take
the connections reads need. Admission is by predicted wait: a newcomer that would wait
longer than its deadline anyway is refused at once (after a short pause that slows clients
which retry at once); while admitted waiters still time out, the wait it admits shrinks to
a share of the deadline, so that about 1% of them do. Under a standing queue that
admission does not bound (no deadline missed yet, so no forecast refuses) the newest
waiter is served first, so that what is served still has its deadline left (adaptive LIFO,
"Fail at Scale", 2015).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import math
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from typing import Any, NoReturn

import asyncpg
from asyncpg import connect_utils

from pglayer._clock import Clock, clock
from pglayer._errors import (
    DatabaseError,
    DatabaseUnavailableError,
    LockTimeoutError,
    PglayerError,
    PoolOverloadedError,
    PoolTimeoutError,
    TooManyConnectionsError,
    explain_connect_error,
    raise_translated,
    refusal,
    translate_connect,
)
from pglayer._logs import Throttle
from pglayer._observability import Observer

__all__ = ["Pool", "Slot"]

_COOL_DOWN_FIRST = 0.05  # seconds callers leave the database alone after a failed connect
_COOL_DOWN_MAX = 0.5
_CANCEL_GRACE = 1.0  # seconds `close` waits for cancelled statements before terminating
_ORPHAN_GRACE = 1.0  # seconds a statement may outlive its lost connection before it is ended
log = logging.getLogger("pglayer")
_LIMITED = Throttle(every=60.0)

Connect = Callable[[], Awaitable[asyncpg.Connection]]

_RESET_TIMEOUT = 5.0
_MAINTENANCE_INTERVAL = 1.0
_REFILL_BACKOFF_MAX = 5.0


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _terminate_late(connecting: asyncio.Future[Any]) -> None:
    """A connect given up on that succeeded anyway: nobody will use it."""
    if not connecting.cancelled() and connecting.exception() is None:
        connecting.result().terminate()


async def _cancel_on_server(raw: Any) -> None:
    """Send the server a cancel request for `raw`'s running statement, and wait until sent.

    asyncpg's own request, as it sends when a statement's task is cancelled; sent from here
    because that one goes from a task of the connection's, which terminating the connection
    cancels before it has reached the server (through PgBouncer too: it forwards it)."""
    cancel: Any = connect_utils._cancel  # type: ignore[attr-defined]  # private, not typed
    await cancel(
        loop=asyncio.get_running_loop(),
        addr=raw._addr,
        params=raw._params,
        backend_pid=raw._protocol.backend_pid,
        backend_secret=raw._protocol.backend_secret,
    )


class Slot:
    """One pooled connection, and the deadline of the query running on it (0: none)."""

    __slots__ = (
        "answered",
        "gone",
        "lane",
        "lost",
        "lost_at",
        "query_deadline",
        "query_task",
        "raw",
        "released_at",
        "retired",
        "timed_out",
        "unsure",
    )

    def __init__(self, raw: asyncpg.Connection, answered: bool) -> None:
        self.raw = raw
        self.answered = answered  # the server has answered on it (see `Pool.behind_pooler`)
        self.lane: Lane | None = None  # the bulkhead holding it, while lent
        self.query_deadline = 0.0
        self.query_task: asyncio.Task[Any] | None = None
        self.timed_out = False
        self.lost = False  # cancelled because its connection closed under the statement
        self.lost_at = 0.0
        self.unsure = False  # given back after an error the driver did not explain
        self.released_at = time.monotonic()
        self.gone = False
        self.retired = False  # closed when given back, not lent again (see `writes_refused`)

    def expire(self, lost: bool = False) -> None:
        """Cancel the running query: its deadline passed, or (`lost`) its connection closed
        under it and the driver waits on regardless (see `Connection`)."""
        task, self.query_task = self.query_task, None
        self.query_deadline = 0.0
        if task is not None and not task.done():
            self.timed_out = True
            self.lost = lost
            task.cancel()


class Lane:
    """One bulkhead: a kind of work, the connections it may hold at once, its waiters."""

    __slots__ = (
        "admit",
        "armed_until",
        "busy",
        "cap",
        "hold",
        "in_use",
        "locked_at",
        "name",
        "rate",
        "refused",
        "released",
        "samples",
        "timeouts",
        "waiters",
        "waiting",
    )

    def __init__(self, name: str, cap: int) -> None:
        self.name = name
        self.cap = cap
        self.in_use = 0
        self.waiters: deque[_Waiter] = deque()  # oldest at the left
        self.waiting = 0  # queued and not yet given a connection or an error
        self.hold = 0.0  # recent time a connection is held (moving average, seconds)
        self.released = 0  # connections given back so far
        self.samples = 0  # hold times measured in all
        self.rate = 0.0  # connections given back per second, lately (see Pool._measure)
        self.busy = 0  # measures of that rate in a row that found waiters
        self.armed_until = 0.0  # forecasts may refuse until then (see Pool._forecast_refuses)
        self.admit = 1.0  # share of its deadline a newcomer may be predicted to wait
        self.refused = 0  # turned away at once: predicted to miss the deadline, or bound
        self.timeouts = 0  # waited, and the deadline came first
        self.locked_at = 0.0  # when work of this lane last waited past its lock bound

    def arm(self, now: float) -> None:
        """Let forecasts refuse for `_ARMED_FOR` seconds: a deadline was missed, or one did.
        A new episode of overload starts from the whole deadline (`_ADMIT_STEP`)."""
        if now > self.armed_until:
            self.admit = 1.0
        self.armed_until = now + _ARMED_FOR

    def head(self) -> _Waiter | None:
        waiters = self.waiters
        while waiters and waiters[0].future.done():
            waiters.popleft()  # left the line already (cancelled, timed out)
        return waiters[0] if waiters else None

    def newest(self) -> _Waiter | None:
        waiters = self.waiters
        while waiters and waiters[-1].future.done():
            waiters.pop()
        return waiters[-1] if waiters else None


class _Waiter:
    __slots__ = ("bound", "future", "lane", "since", "standing_at", "until")

    def __init__(
        self,
        future: asyncio.Future[Slot],
        lane: Lane,
        since: float,
        until: float,
        bound: float,
        predicted: float,
    ):
        self.future = future
        self.lane = lane
        self.since = since
        self.until = until
        self.bound = bound  # the caller's lock bound (0: none), if its lane gets stuck
        # Still waiting by then, it has waited well past what admission predicted (_STANDING).
        self.standing_at = since + predicted + (until - since - predicted) * _STANDING


_HOLD_WEIGHT = 0.1  # of the newest sample in a lane's moving average of hold times
_MEAN_OF = 10  # first holds averaged plainly (1/n >= _HOLD_WEIGHT up to here)
# A queue is standing, and served newest first, once its oldest waiter has used this much of
# the slack its admission left it (its wait less the wait predicted for it): the pace dropped
# after admission (a lock, a slow server). Not of its whole wait: at the admission limit the
# last admitted is predicted nearly all of it, and serving newer waiters first timed out the
# ones FIFO serves in time (`storm`: 45% of admitted requests ended 503 `unavailable`).
_STANDING = 0.8
_RATE_INTERVAL = 0.1  # seconds between measures of each lane's release rate
_RATE_WEIGHT = 0.2  # of the newest interval in that moving average (~0.5 s of memory)
# Measures in a row with waiters (~1 s) after which a lane's rate alone is its pace: by then
# 89% of that moving average comes from intervals with a queue, which measure what the lane
# can serve, not how much work came.
_BUSY_TRUSTED = 10
# Seconds a missed deadline, or a refusal by predicted wait, keeps admission armed.
_ARMED_FOR = 1.0
# A refusal pauses a share of the wait it predicts (at least `refusal_delay`, at most
# `_PACE_MAX`): a client told "a connection is 4 s away" gains nothing by asking again at
# once, and each early retry costs the server about as much CPU as serving a request.
_PACE_SHARE = 0.2
_PACE_MAX = 1.0
# The share of its deadline a newcomer may be predicted to wait (`Lane.admit`) is tuned by
# what admission let in: each waiter that times out lowers it a step, each one served raises
# it a hundredth of a step, so that about 1% of admitted waiters miss. The forecast is of the
# mean wait, and under a retry storm the pace swings with the loop's turns (admitted on a
# moment's pace, waiters then waited twice their forecast): at the whole deadline 10% of the
# admitted waiters timed out (`storm`, one worker), each after costing what a served request
# costs, where a refusal at the door costs a fifth of it. With a floor of a half it sat at
# the floor with 6% still missing; at a quarter, ~3%.
_ADMIT_STEP = 0.01
_ADMIT_MIN = 0.25


_RETIRE_EVERY = 1.0  # seconds between two replacements of every connection (read-only)
_PROBE_TIMEOUT = 1.0  # seconds a live server takes at most to answer a connect and SELECT 1


def _stop_naming_statements(raw: Any) -> None:
    # Private, as asyncpg reads it: with it off, new statements are unnamed. Those it cached
    # stay (one may be running now): each fails once, and its connection forgets them.
    raw._stmt_cache_enabled = False


def _needs_reset(raw: Any) -> bool:
    # A transaction left open (on the server, or in asyncpg's bookkeeping: a task cancelled
    # inside `transaction()` leaves both), a query cancelled mid-flight (asyncpg's pool asks
    # the same private questions), or LISTEN registrations: unfit for the next borrower.
    return (
        raw.is_in_transaction()
        or raw._top_xact is not None
        or raw._protocol._is_cancelling()
        or bool(raw._listeners)
        or bool(raw._log_listeners)
    )


class Pool:
    """Up to `max_size` connections made by `connect`; at most `max_waiters` waiting.

    `open()` makes `min_size` connections (serving with fewer if the server refuses some,
    and filling up in the background); `close(timeout)` waits for connections in use.
    """

    def __init__(
        self,
        connect: Connect,
        *,
        name: str,
        min_size: int,
        max_size: int,
        max_waiters: int,
        acquire_timeout: float,
        query_timeout: float,
        statement_timeout: float = 0.0,
        max_idle: float,
        connect_timeout: float,
        observer: Observer,
        bulkheads: Mapping[str, int] | None = None,
        refusal_delay: float = 0.0,
        target: str = "the server",
        behind_pooler: bool = False,
    ) -> None:
        self.name = name
        # A pooler logs clients in itself (PgBouncer from the server parameters it keeps)
        # and reaches the server at their first statement: until a connection has answered
        # one, its loss is a failed connect (counted, cooled down), not a lost connection.
        self.behind_pooler = behind_pooler
        self.target = target  # where it connects, masked: for the log
        self.min_size = min_size
        self.max_size = max_size
        self.max_waiters = max_waiters
        self.acquire_timeout = acquire_timeout
        self.query_timeout = query_timeout
        self.statement_timeout = statement_timeout  # the server's own bound (0: none)
        # When the server last answered on any connection (see `silent`).
        self.answered_at = time.monotonic()
        self._silent_at = 0.0  # when `silent` last found the server silent
        self._probe: asyncio.Future[bool] | None = None  # `server_silent`'s, while it runs
        self._retired_at = -math.inf  # when `writes_refused` last retired every connection
        self.statements_kept = True  # False once `statements_lost`
        self.max_idle = max_idle
        self.connect_timeout = connect_timeout
        self.observer = observer
        self._connect = connect
        self._slots: list[Slot] = []  # every open connection
        self._orphans: list[Slot] = []  # lost while a statement ran on it, until it ends
        self._connecting: set[asyncio.Future[asyncpg.Connection]] = set()
        self._idle: deque[Slot] = deque()  # most recently used at the right
        self._size = 0  # open connections plus those being made
        # After a failed connect, callers do not try again for a moment (doubling to
        # _COOL_DOWN_MAX while they keep failing): in an outage every request would
        # otherwise try its own connect, a thousand a second. Background refills go on.
        self._cool_down_until = 0.0
        self._connect_failures = 0
        self._connect_error: DatabaseError = DatabaseUnavailableError()
        self._unreachable = False  # the pooler cannot reach the server (until an answer)
        self._in_use = 0
        self.refusal_delay = refusal_delay
        # Unnamed work is a read or a write; other names come from the caller (`bulkhead=`).
        caps = {"read": max_size, "write": max_size, **(bulkheads or {})}
        self._lanes = {name: Lane(name, min(cap, max_size)) for name, cap in caps.items()}
        self.lanes_by_name = self._lanes  # read-only view for the per-request lookup
        self._waiting = 0  # in every lane
        self._deadlines: list[tuple[float, int, _Waiter]] = []
        self._paced: list[tuple[float, int, asyncio.Future[None]]] = []  # a heap by due time
        self._measured_at = time.monotonic()
        self._order = itertools.count()
        self._background: set[asyncio.Task[Any]] = set()
        self._maintenance: asyncio.Task[None] | None = None
        self._clock: Clock | None = None
        self._drained: asyncio.Event | None = None
        self.open = False
        self.closed = False

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> int:
        """Make up to `min_size` connections; return how many. Raises if none could be made
        while `min_size` > 0 (the cause is the first connection error, translated)."""
        self._clock = clock()
        self._clock.subscribe(self._tick)
        self.closed = False
        wanted = self.min_size
        self._size += wanted
        results = await asyncio.gather(
            *(self._new_slot() for _ in range(wanted)), return_exceptions=True
        )
        made = 0
        first_error: BaseException | None = None
        for result in results:
            if isinstance(result, Slot):
                made += 1
                self._idle.append(result)
            else:
                self._size -= 1
                first_error = first_error or result
        if wanted and not made:
            self._clock.unsubscribe(self._tick)
            assert first_error is not None
            raise first_error
        self.open = True
        if made < wanted:
            log.warning(
                "pool %s: %d of min_size %d connections made (%s); filling in the background",
                self.name,
                made,
                wanted,
                type(first_error).__name__,
            )
        self._maintenance = asyncio.get_running_loop().create_task(self._maintain())
        return made

    async def close(self, timeout: float) -> None:
        """Stop lending; wait up to `timeout` for connections in use, then terminate them."""
        if self.closed:
            return
        self.closed = True
        self.open = False
        if self._maintenance is not None:
            self._maintenance.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintenance
            self._maintenance = None
        self._fail_waiters(DatabaseUnavailableError())
        paced, self._paced = self._paced, []
        for _, _, paused in paced:  # refusals being paused: answer them now
            if not paused.done():
                paused.set_result(None)
        idle, self._idle = list(self._idle), deque()
        await asyncio.gather(*(self._close_slot(s) for s in idle), return_exceptions=True)
        if self._in_use or self._background:
            self._drained = asyncio.Event()
            try:
                async with asyncio.timeout(timeout):
                    while self._in_use or self._background:
                        self._drained.clear()
                        await self._drained.wait()
            except TimeoutError:
                running = [slot for slot in self._slots if slot.query_deadline]
                log.warning(
                    "pool %s: connections still in use after %.1fs; cancelling %d statement(s)"
                    " on the server, then terminating them",
                    self.name,
                    timeout,
                    len(running),
                )
                await self._cancel_running(running)
        for slot in list(self._slots):
            slot.raw.terminate()
        for slot in [*self._slots, *self._orphans]:  # the clock stops: nothing may run on
            if slot.query_deadline:
                slot.expire(lost=True)
        for task in list(self._background):
            task.cancel()
        if self._clock is not None:
            self._clock.unsubscribe(self._tick)

    async def _cancel_running(self, running: list[Slot]) -> None:
        """Cancel `running` statements on the server and wait a moment for them to end: a
        terminated connection alone leaves its statement running there (PostgreSQL notices
        a vanished client only when it next writes to it; behind PgBouncer, never)."""
        assert self._drained is not None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_CANCEL_GRACE):
                await asyncio.gather(
                    *(_cancel_on_server(slot.raw) for slot in running), return_exceptions=True
                )
                while self._in_use:  # each statement ends with 57014, its connection back
                    self._drained.clear()
                    await self._drained.wait()

    # -- lending ---------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def borrowed(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection for pglayer's own checks at open: not counted as traffic."""
        slot = self._idle.pop() if self._idle else None
        if slot is None:
            self._size += 1
            try:
                slot = await self._new_slot()
            except BaseException:
                self._size -= 1
                raise
        try:
            yield slot.raw
        finally:
            self._give_back(slot)

    def lane(self, name: str) -> Lane:
        """The bulkhead `name` (one not configured may use the whole pool)."""
        found = self._lanes.get(name)
        if found is None:
            found = self._lanes[name] = Lane(name, self.max_size)
            # Said once, at its first use: a misspelt name is a class without a cap.
            log.warning(
                "pool %s: bulkhead %r has no cap (PGLAYER_BULKHEADS names %s): it may hold"
                " the whole pool",
                self.name,
                name,
                ", ".join(sorted(self._lanes.keys() - {name})),
            )
        return found

    def take(self, lane: Lane) -> Slot | None:
        """A free connection at once, or None (then `acquire()` waits in line)."""
        if lane.waiting or lane.in_use >= lane.cap:
            return None
        idle = self._idle
        while idle:
            slot = idle.pop()
            if slot.raw.is_closed():
                self._forget(slot)
                continue
            slot.lane = lane  # _lend, spelled out: every request passes here
            lane.in_use += 1
            self._in_use += 1
            self.observer.acquired(0.0)
            clk = self._clock
            if clk is not None:
                clk.wake()
            return slot
        return None

    def _lend(self, slot: Slot, lane: Lane) -> None:
        slot.lane = lane
        lane.in_use += 1
        self._in_use += 1

    async def acquire(
        self,
        lane: Lane,
        timeout: float | None = None,
        deadline: float | None = None,
        bound: float = 0.0,
    ) -> Slot:
        """A connection for `lane` within `timeout` (default `acquire_timeout`) and before
        `deadline`; refused at once when it would not come in time anyway. `bound`: the
        caller's lock bound, which also ends its wait if the lane gets stuck (`stuck`)."""
        slot = self.take(lane)
        if slot is not None:
            return slot
        if not self.open:
            raise self._refused(DatabaseUnavailableError())
        started = time.monotonic()
        wait = self.acquire_timeout if timeout is None else timeout
        if deadline is not None:
            left = deadline - started
            if left <= 0:
                raise self._refused(
                    PoolTimeoutError("the request deadline passed before a connection was free")
                )
            wait = min(wait, left)
        grown = None
        if self._size < self.max_size and not self._waiting and lane.in_use < lane.cap:
            grown = await self._grow_for_caller(lane, wait)
        slot = grown or await self._wait_in_line(lane, started, wait, bound)
        self.observer.acquired(time.monotonic() - started)
        assert self._clock is not None
        self._clock.wake()
        return slot

    def _cooling_down(self) -> DatabaseError | None:
        """While callers leave the server alone after a failed connect, what to answer them
        (the same kind of error as the failure, for the caller's retry policy)."""
        if self._connect_failures and time.monotonic() < self._cool_down_until:
            last = self._connect_error
            return type(last)(
                "a connect failed moments ago: not tried again yet", sqlstate=last.sqlstate
            )
        return None

    async def _grow_for_caller(self, lane: Lane, wait: float) -> Slot | None:
        """A new connection lent to `lane`; None when the caller should wait in line for one
        of those open instead (a connect refused or cooling down while others are open: a
        server at its connection limit, say)."""
        cooling = self._cooling_down()
        if cooling is not None:
            if self._size and not self._unreachable:
                return None
            raise self._refused(cooling)
        self._size += 1
        lane.in_use += 1  # while it connects: callers growing at once see the lane's cap
        try:
            slot = await self._new_slot(min(wait, self.connect_timeout))
        except BaseException as exc:
            self._size -= 1
            lane.in_use -= 1
            if not isinstance(exc, PglayerError):
                raise
            if self._size and not self._unreachable:
                return None
            self.observer.acquire_failed(exc)
            self._fail_waiters(exc)  # nothing open to wait for: see `_connect_for_waiters`
            raise
        slot.lane = lane
        self._in_use += 1
        return slot

    def predicted_wait(self, lane: Lane, coming: int = 0) -> float:
        """How long a newcomer to `lane` would wait: the waiters ahead of it (and `coming`),
        at the pace the connections it may use come free (its recent hold time each)."""
        if not lane.rate or lane.samples < lane.cap:
            # No pace measured yet over a busy interval, or fewer holds than connections:
            # the first holds of a cold start (a flood of new clients, cold backends) are
            # slow moments, not the lane's pace. Let it wait; its deadline still bounds it.
            return 0.0
        ahead = 1 + coming
        for other in self._lanes.values():  # a loop, not sum(): every waiter passes here
            if other is lane or other.in_use < other.cap:
                ahead += other.waiting
        usable = max(min(lane.cap, self.max_size - (self._in_use - lane.in_use)), 1)
        # The pace at which this lane's connections come free. After a second with a queue,
        # its measured rate: hold times leave out what else takes the CPU, and under a storm
        # of refusals overrated the pace twice over, admitting work that then timed out.
        # Before (a queue just formed, a flood of new clients): whichever is faster, as a
        # cold start's slow first moments are not the lane's pace.
        pace = lane.rate if lane.busy >= _BUSY_TRUSTED else max(lane.rate, usable / lane.hold)
        return ahead / pace

    async def _wait_in_line(self, lane: Lane, since: float, wait: float, bound: float) -> Slot:
        cooling = self._cooling_down()
        if cooling is not None and (not self._size or self._unreachable):
            raise self._refused(cooling)  # no connection to wait for, and none being made
        if self._waiting >= self.max_waiters:
            error = PoolOverloadedError(retry_after=self.predicted_wait(lane))
            await self._refuse(lane, error, since + wait)
        predicted = self.predicted_wait(lane)
        if self._forecast_refuses(lane, predicted, wait):
            # It would not get a connection in time: say so now, not after the wait.
            await self._refuse(lane, PoolOverloadedError(retry_after=predicted), since + wait)
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop.create_future(), lane, since, since + wait, bound, predicted)
        lane.waiters.append(waiter)
        lane.waiting += 1
        self._waiting += 1
        heapq.heappush(self._deadlines, (waiter.until, next(self._order), waiter))
        if self._idle:
            self._serve_idle()
        if self._size < self.max_size and cooling is None and not waiter.future.done():
            self._grow_for_waiters()
        assert self._clock is not None
        self._clock.wake()
        try:
            return await waiter.future
        except asyncio.CancelledError:
            future = waiter.future
            if future.cancelled():  # nobody answered it: it leaves the line itself
                lane.waiting -= 1
                self._waiting -= 1
            elif future.exception() is None:
                self._return_unused(future.result())  # handed one just as it was cancelled
            raise

    def _serve_idle(self) -> None:
        """Hand idle connections to those in line: connections that came back while a
        caller was connecting (nobody waited yet) stay idle once its connect is refused and
        it queues, and no release would come to wake it (a server at its connection limit:
        every caller then waited out its deadline beside idle connections)."""
        for _ in range(len(self._idle)):
            if not self._waiting:
                return
            slot = self._idle.pop()
            if slot.raw.is_closed():
                self._forget(slot)
            else:
                self._put(slot)  # back to the idle set if no lane in line may take it

    @staticmethod
    def _forecast_refuses(lane: Lane, predicted: float, wait: float) -> bool:
        """Whether a newcomer predicted to wait `predicted` is refused for a `wait` of it
        (more than the lane's `admit` share of it): only while the lane is armed, and a
        refusal keeps it armed.

        A flood of new clients slows the pace for a few seconds (1,024 new connections:
        holds of 100-180 ms), and the forecast, extrapolating it, refused orders the pool
        then served in time. So a forecast alone refuses nothing: once one of the lane's
        deadlines has been missed it has been proved right, and refuses until it stops
        predicting misses.
        """
        if predicted <= wait * lane.admit:
            return False
        now = time.monotonic()
        if now > lane.armed_until:
            return False
        lane.arm(now)
        return True

    def stuck(self, lane: Lane) -> None:
        """Work of `lane` waited past its lock bound: the lane counts as stuck on a lock,
        and its waiters with a lock bound stop waiting when their bound ends."""
        now = lane.locked_at = time.monotonic()
        for waiter in lane.waiters:
            end = waiter.since + waiter.bound
            if not waiter.bound or end >= waiter.until or waiter.future.done():
                continue
            # Queued before the lane was stuck, its wait is on the same lock.
            if end <= now:
                self._time_out(waiter)  # now, before a release hands it a connection
            else:
                waiter.until = end
                heapq.heappush(self._deadlines, (end, next(self._order), waiter))
        assert self._clock is not None
        self._clock.wake()

    @staticmethod
    def progressed(lane: Lane) -> None:
        """Work of `lane` committed: the lane is not stuck on a lock (see `stuck`)."""
        lane.locked_at = 0.0

    async def _refuse(self, lane: Lane, error: PoolOverloadedError, until: float) -> NoReturn:
        """Count and raise `error`, after a pause that ends by `until` (`pause_refusal`)."""
        lane.refused += 1
        self._refused(error)
        await self.pause_refusal(error.retry_after or 0.0, until)
        raise error

    async def pause_refusal(self, predicted: float = 0.0, deadline: float | None = None) -> None:
        """Wait before a refusal is answered (see `pace`)."""
        paused = self.pace(predicted, deadline)
        if paused is not None:
            await paused

    def pace(self, predicted: float, deadline: float | None = None) -> asyncio.Future[None] | None:
        """A future that ends the pause before a refusal, or None for no pause: at least
        `refusal_delay`, a share of the `predicted` wait if longer (at most half of
        `acquire_timeout`); longer while refusals outnumber what the pool serves (see
        `_storm_pause`); at most 1 s, never past `deadline`. A client that retries at once
        then retries later, at no cost to the server (no timer: the clock ends the pause)."""
        if not self.refusal_delay or self._clock is None:
            return None
        now = time.monotonic()
        # Half the wait it spares at most: a refusal is the fast answer...
        pause = min(max(self.refusal_delay, predicted * _PACE_SHARE), self.acquire_timeout / 2)
        due = now + min(max(pause, self._storm_pause()), _PACE_MAX)
        if deadline is not None:
            due = min(due, deadline)
        if due <= now:
            return None
        paused: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._paced, (due, next(self._order), paused))
        self._clock.wake()
        return paused

    def _storm_pause(self) -> float:
        """...unless clients retry at once: the refusals already paused over the pace the
        pool serves at (trusted lanes only), so that refusals come back about as often as
        connections come free, whatever the number of clients.

        A retry storm is a closed loop: each refused client returns one pause later, so N
        of them paused p seconds each send N / p refusals a second. With the fixed pause,
        456 clients against one worker sent 7,400 a second, which took the CPU the served
        requests needed (1,100-1,800 2xx/s of a 4,455 peak); paced like this, ~2,900-3,100.
        """
        rate = 0.0
        for lane in self._lanes.values():
            if lane.busy >= _BUSY_TRUSTED:
                rate += lane.rate
        return len(self._paced) / rate if rate else 0.0

    def release(self, slot: Slot, held: float, suspect: bool = False) -> bool:
        """Give `slot` back: to the oldest waiter, to the idle set, or to a reset first.
        True if its holder left a transaction of its own open (its `BEGIN`), which the
        reset rolls back.

        `suspect`: its work ended by a cancellation or a deadline, which may have come
        between a statement's Parse (sent without a Sync) and its Bind: the server then still
        waits in that statement (`active`, `ClientRead`; behind PgBouncer the server
        connection is never idle again). A query before reuse ends that (see `_reset`).
        """
        lane = slot.lane
        assert lane is not None
        lane.in_use -= 1
        lane.released += 1
        self._in_use -= 1
        lane.samples += 1
        # A plain mean of the first few: one slow first hold (a cold backend, a flood of new
        # connections) must not stand for the lane's pace while a queue forms behind it.
        samples = lane.samples
        lane.hold += (held - lane.hold) * (1 / samples if samples < _MEAN_OF else _HOLD_WEIGHT)
        self.observer.released(held)
        ended_well = not suspect  # its holder's work was not cut short
        if slot.query_deadline or slot.unsure:
            # A statement still running on it (its holder left without waiting for it), or
            # the driver's state unknown: checked before it is lent again (see `_reset`).
            suspect, slot.unsure = True, False
        return self._give_back(slot, suspect, ended_well)

    def _return_unused(self, slot: Slot) -> None:
        lane = slot.lane
        assert lane is not None
        lane.in_use -= 1
        self._in_use -= 1
        self._give_back(slot)

    def _give_back(self, slot: Slot, suspect: bool = False, ended_well: bool = False) -> bool:
        slot.query_task = None
        slot.lane = None
        raw: Any = slot.raw  # private state, as asyncpg's own pool reads it
        left_open = False
        if raw.is_closed():
            self._forget(slot)
        elif self.closed:
            self._spawn(self._close_slot(slot))
        elif suspect or _needs_reset(raw):
            # Asked only here: on the way back to the idle set it costs nothing.
            left_open = ended_well and raw.is_in_transaction() and raw._top_xact is None
            self._spawn(self._reset(slot))
        else:
            if not slot.answered:
                self._first_answer(slot)
            self._put(slot)
        if self._drained is not None and not self._in_use:
            self._drained.set()
        return left_open

    def _first_answer(self, slot: Slot) -> None:
        slot.answered = True
        self._connect_failures = 0  # the pooler reached the server
        self._unreachable = False

    def _next_waiter(self) -> _Waiter | None:
        """Whom a free connection goes to: the oldest waiter of a lane below its cap; but
        once that one has waited well past its predicted wait while admission was not
        refusing, the newest of its lane (adaptive LIFO)."""
        while self._waiting:
            oldest = None
            for lane in self._lanes.values():
                if lane.waiting and lane.in_use < lane.cap:
                    head = lane.head()
                    if head is not None and (oldest is None or head.since < oldest.since):
                        oldest = head
            if oldest is None:
                return None
            now = time.monotonic()
            if oldest.until > now:
                return self._take_waiter(oldest, now)
            # Its deadline passed before the tick saw it (a tick, or the loop's lag, later):
            # served now, it would wait past the bound it was promised, then 503.
            self._expire(oldest)
        return None

    def _take_waiter(self, oldest: _Waiter, now: float) -> _Waiter:
        lane = oldest.lane
        # While armed, admission refuses what its forecast says would miss, which bounds
        # the queue: FIFO serves what it admitted. Newest first then timed out waiters it
        # would have served (`storm`: 2,900-4,100 `unavailable` in 6 s, 1,100-1,700 without).
        standing = now > oldest.standing_at and now > lane.armed_until
        chosen = lane.newest() if standing else oldest
        assert chosen is not None
        (lane.waiters.pop if chosen is not oldest else lane.waiters.popleft)()
        lane.waiting -= 1
        self._waiting -= 1
        return chosen

    def _put(self, slot: Slot) -> None:
        waiter = self._next_waiter() if self._waiting else None
        if waiter is None:
            slot.released_at = time.monotonic()
            self._idle.append(slot)
            return
        lane = waiter.lane
        if lane.admit < 1.0:
            lane.admit = min(lane.admit + _ADMIT_STEP / 100, 1.0)
        self._lend(slot, lane)
        waiter.future.set_result(slot)

    def _fail_head(self, error: BaseException) -> bool:
        oldest = None
        for lane in self._lanes.values():
            head = lane.head()
            if head is not None and (oldest is None or head.since < oldest.since):
                oldest = head
        if oldest is None:
            return False
        oldest.lane.waiters.popleft()
        oldest.lane.waiting -= 1
        self._waiting -= 1
        oldest.future.set_exception(error)
        return True

    def answered(self) -> None:
        """The server answered elsewhere (a health check): connect at once again, not after
        the cool-down its failed connects set."""
        self._cool_down_until = 0.0
        self._connect_failures = 0
        self._unreachable = False

    def silent(self, spent: float) -> bool | None:
        """Whether a statement that ran `spent` seconds to its deadline found the server
        stopped or cut off, not slow: its own `statement_timeout` would have ended it, the
        server has answered nothing on any connection for longer than that, and others wait
        on it too, or did since its last answer (the last of those that went silent
        together). None for a statement alone, which may have lifted its bound with `SET
        LOCAL`: `server_silent()` asks the server (not behind a pooler, which answers a
        connect itself and may queue a query: False)."""
        bound = self.statement_timeout
        now = time.monotonic()
        if not 0.0 < bound < spent or now - self.answered_at <= bound:
            return False
        if self._silent_at > self.answered_at:
            return True
        if self._in_use > 1 or self._waiting > 0 or self._connecting:
            self._silent_at = now
            return True
        return None if not self.behind_pooler else False

    async def server_silent(self) -> bool:
        """Whether the server answers nothing to a connect and `SELECT 1` of its own within
        a second (a live one answers a connect even at its limits: with 53300). One probe
        at a time, shared by those who ask while it runs."""
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(self._probe_once())
        return await asyncio.shield(self._probe)

    async def _probe_once(self) -> bool:
        try:
            async with asyncio.timeout(min(_PROBE_TIMEOUT, self.connect_timeout)):
                raw = await self._connect()
                try:
                    await raw.fetchval("SELECT 1")
                finally:
                    raw.terminate()
        except asyncpg.PostgresError:
            return False  # a refusal is an answer
        except Exception:  # no answer in time, or nothing listening
            self._silent_at = time.monotonic()
            return True
        self.answered_at = time.monotonic()
        return False

    def statements_lost(self) -> None:
        """Prepared statements do not survive the pooler in front (see `Connection`): every
        connection, and each made from now on, stops naming them (asyncpg's cache off)."""
        if not self.statements_kept:
            return
        self.statements_kept = False
        log.warning(
            "pool %s: prepared statements are lost behind the pooler (a transaction pooler"
            " now?): asyncpg's statement cache is off from now on; set"
            " PGLAYER_POOLER=pgbouncer-transaction (or auto)",
            self.name,
        )
        for slot in self._slots:
            _stop_naming_statements(slot.raw)

    def writes_refused(self) -> None:
        """A write was refused as read-only (25006) on a connection lent for writes. A session
        keeps `default_transaction_read_only` from its start, so every connection open now is
        replaced: idle ones now, those in use when given back. At most once a second: while
        new sessions are read-only too, once per refused write would be a connect storm."""
        now = time.monotonic()
        if now - self._retired_at < _RETIRE_EVERY:
            return
        if self.behind_pooler and now - self._retired_at > 60:
            log.warning(
                "pool %s: the database refuses writes as read-only; a pooler in front keeps"
                " its server connections (and their setting) after the server is writable"
                " again: RECONNECT them on its console",
                self.name,
            )
        self._retired_at = now
        idle, self._idle = list(self._idle), deque()
        for slot in idle:
            self._spawn(self._close_slot(slot))
        for slot in self._slots:
            if slot.lane is not None:
                slot.retired = slot.unsure = True  # through `_reset`, which closes it

    def abandon(self) -> None:
        """Fail the waiters and the connects under way, and close every connection, in use
        too (see `Database.abandon`)."""
        self._fail_waiters(DatabaseUnavailableError("the server stopped answering"))
        for connecting in list(self._connecting):
            connecting.cancel()
        for slot in list(self._slots):
            slot.raw.terminate()

    def _fail_waiters(self, error: PglayerError) -> None:
        while self._fail_head(error):
            self.observer.acquire_failed(error)

    def _refused(self, error: PglayerError) -> PglayerError:
        self.observer.acquire_failed(error)
        return error

    # -- connections -----------------------------------------------------------------

    async def _new_slot(self, timeout: float | None = None) -> Slot:
        """Connect (the caller has already counted it in `_size`)."""
        try:
            raw = await self._connect_abandonable(timeout or self.connect_timeout)
        except Exception as exc:
            self._connect_failed()
            error = translate_connect(exc)
            if isinstance(error, DatabaseError) and not self._refusal_stands(error):
                self._connect_error = error
            if isinstance(self._connect_error, TooManyConnectionsError) and self._connect_failures:
                self._say_limited()
            raise_translated(exc, error)
        if self.closed:
            raw.terminate()
            raise DatabaseUnavailableError()
        slot = Slot(raw, answered=not self.behind_pooler)
        if not self.statements_kept:
            _stop_naming_statements(raw)
        if slot.answered:
            self._connect_failures = 0
            self.answered_at = time.monotonic()
        raw.add_termination_listener(lambda _raw: self._forget(slot))
        self._slots.append(slot)
        self.observer.connection_opened()
        return slot

    def _refusal_stands(self, error: DatabaseError) -> bool:
        """Whether the server's refusal said before `error` still says why connects fail:
        PgBouncer says it once, then holds its clients (`server_login_retry`) until they
        time out, which would otherwise read as a server that does not answer."""
        return (
            self.behind_pooler
            and self._connect_failures > 1
            and refusal(error) is None
            and refusal(self._connect_error) is not None
        )

    @property
    def refused_by(self) -> str | None:
        """The SQLSTATE with which the server refused this pool's last connect (53300, its
        connection limit, say), until a connect succeeds; None otherwise."""
        return refusal(self._connect_error) if self._connect_failures else None

    def _say_limited(self) -> None:
        """Said once a minute: callers wait for the connections open, so without it a pool
        held small by the server's limit (another app's connections) is silent but slow, and
        one held at none said only "refill failed" at INFO while its requests were 503s."""
        left_out = _LIMITED.allow(self.name)
        if left_out is not None:
            open_now = len(self._slots)
            log.warning(
                "pool %s: the server refused %s connection (53300: a connection limit is"
                " reached); %s%s",
                self.name,
                "another" if open_now else "a",
                f"serving with {open_now} of {self.max_size}"
                if open_now
                else "it has none, and its requests are answered 503",
                f", refused {left_out} more time(s) since this was said" if left_out else "",
            )

    async def _connect_abandonable(self, timeout: float) -> asyncpg.Connection:
        """`_connect()` within `timeout`, cut short by `abandon()` (a server that stopped
        answering: those connecting would otherwise wait out the connect timeout)."""
        connecting: asyncio.Future[asyncpg.Connection] = asyncio.ensure_future(self._connect())
        self._connecting.add(connecting)
        try:
            return await asyncio.wait_for(asyncio.shield(connecting), timeout)
        except asyncio.CancelledError:
            if connecting.cancelled() and not _being_cancelled():
                raise DatabaseUnavailableError("the server stopped answering") from None
            raise
        finally:
            self._connecting.discard(connecting)
            if not connecting.done():
                connecting.cancel()
                connecting.add_done_callback(_terminate_late)
            elif not connecting.cancelled():
                # Its failure may have come as `wait_for` gave up, when the shield no longer
                # retrieves it: asyncio would log "Task exception was never retrieved".
                connecting.exception()

    def _connect_failed(self) -> None:
        self.observer.connection_failed()
        self._connect_failures += 1
        doublings = min(self._connect_failures - 1, 10)  # 2.0 ** 1024 overflows a float
        cool_down = min(_COOL_DOWN_FIRST * 2**doublings, _COOL_DOWN_MAX)
        self._cool_down_until = time.monotonic() + cool_down

    def _grow_for_waiters(self) -> None:
        self._size += 1
        self._spawn(self._connect_for_waiters())

    async def _connect_for_waiters(self) -> None:
        try:
            slot = await self._new_slot()
        except Exception as exc:
            self._size -= 1
            error = exc if isinstance(exc, PglayerError) else DatabaseUnavailableError()
            if not self._size or self._unreachable:
                # Nothing open or being opened: the waiters would wait for a connect that
                # the cool-down holds back. Each learns why at once and may retry. (Trying
                # again at once for each of them was a connect storm against a server that
                # is down: a thousand failed connects a second under 100 clients.)
                self._fail_waiters(error)
            # Else they wait for the connections still open (a server at its connection
            # limit refuses more: 53300), within their own deadlines.
            return
        self._put(slot)

    def _forget(self, slot: Slot) -> None:
        """`slot`'s connection is closed: stop counting it (once), replace it if needed."""
        if slot.gone:
            return
        slot.gone = True
        self._size -= 1
        if self.closed or getattr(slot.raw, "closed_by_client", False):
            self.observer.connection_closed()  # retired: idle lifetime, shutdown
        elif not slot.answered:
            self._connect_error = DatabaseUnavailableError("the pooler did not reach the server")
            self._connect_failed()
            self._unreachable = True
        else:
            self.observer.connection_lost()
        with contextlib.suppress(ValueError):
            self._slots.remove(slot)
        with contextlib.suppress(ValueError):
            self._idle.remove(slot)
        if slot.query_deadline:
            # Lost under a running statement that may never end by itself (asyncpg's COPY
            # waits on for ever): the clock ends it if it has not ended a moment later.
            slot.lost_at = time.monotonic()
            self._orphans.append(slot)
        if not self._waiting or self.closed:
            return
        if self._cooling_down() is None:
            if self._size < self.max_size:
                self._grow_for_waiters()
        elif not self._size or self._unreachable:
            # Nothing open, or what is open is behind a pooler that cannot reach the server
            # either: see `_connect_for_waiters`.
            self._fail_waiters(self._connect_error)

    async def _reset(self, slot: Slot) -> None:
        if slot.retired:
            await self._close_slot(slot)
            return
        raw: Any = slot.raw  # private state, as asyncpg's own pool reads it
        try:
            async with asyncio.timeout(_RESET_TIMEOUT):
                # ROLLBACK first waits for a cancelled query to finish, and as a simple query
                # it ends an extended one left without its Sync; outside a transaction (and
                # in that case) a plain query does, without ROLLBACK's warning.
                cancelling = raw._protocol._is_cancelling()
                in_transaction = raw.is_in_transaction() or raw._top_xact is not None
                await raw.execute("ROLLBACK" if in_transaction or cancelling else "SELECT 1")
                raw._top_xact = None
                if raw._listeners or raw._log_listeners:
                    await raw.execute("UNLISTEN *")
                    raw._listeners.clear()
                    raw._log_listeners.clear()
        except (Exception, asyncio.CancelledError):
            log.debug("pool %s: reset failed; connection discarded", self.name, exc_info=True)
            getattr(raw, "terminate_broken", raw.terminate)()
            self._forget(slot)
            return
        if not slot.answered:
            self._first_answer(slot)
        if self.closed:
            await self._close_slot(slot)
        else:
            self._put(slot)

    async def _close_slot(self, slot: Slot) -> None:
        try:
            await slot.raw.close(timeout=_RESET_TIMEOUT)
        except Exception:
            slot.raw.terminate()
        self._forget(slot)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if self._drained is not None and not self._background:
            self._drained.set()

    # -- upkeep ----------------------------------------------------------------------

    def _expire(self, waiter: _Waiter) -> None:
        lane = waiter.lane
        lane.admit = max(lane.admit - _ADMIT_STEP, _ADMIT_MIN)
        self._time_out(waiter)

    def _time_out(self, waiter: _Waiter) -> None:
        now = time.monotonic()
        # At its deadline, not when the tick saw it (up to a tick, or the loop's lag, later):
        # a deadline on a bucket's bound (5 s) put every timeout in the bucket above it, and
        # the p99 read 6-10 s, waits no caller had.
        self.observer.waited_in_vain(round(waiter.until - waiter.since, 6))
        waiter.lane.arm(now)
        waiter.lane.waiting -= 1
        waiter.lane.timeouts += 1
        self._waiting -= 1
        if waiter.bound and waiter.lane.locked_at:
            # Its lane's connections are held by waits on a lock: it waited on that lock,
            # not for a pool too small (which PoolTimeoutError, and its alert, would say).
            error: PglayerError = LockTimeoutError(
                "no connection within the lock bound: this bulkhead's connections wait on a lock"
            )
        else:
            error = PoolTimeoutError()
        waiter.future.set_exception(self._refused(error))

    def _tick(self, now: float) -> bool:
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            waiter = heapq.heappop(deadlines)[2]
            if not waiter.future.done():
                self._expire(waiter)
        paced = self._paced
        while paced and paced[0][0] <= now:
            paused = heapq.heappop(paced)[2]
            if not paused.done():
                paused.set_result(None)
        for slot in self._slots:
            due = slot.query_deadline
            if due and due <= now:
                slot.expire()
        if self._orphans:
            self._orphans = [slot for slot in self._orphans if not self._expired(slot, now)]
        if now - self._measured_at >= _RATE_INTERVAL:
            self._measure(now)
        return bool(self._in_use or self._waiting or paced)

    @staticmethod
    def _expired(slot: Slot, now: float) -> bool:
        """Whether an orphan's statement has ended, or is now made to: the driver normally
        ends it with the connection; one still waiting a moment later never will."""
        if slot.query_deadline and now - slot.lost_at >= _ORPHAN_GRACE:
            slot.expire(lost=True)
        return not slot.query_deadline

    def _measure(self, now: float) -> None:
        """Each lane's rate of releases, a moving average over intervals of ~0.1 s."""
        interval = now - self._measured_at
        self._measured_at = now
        for lane in self._lanes.values():
            done, lane.released = lane.released, 0
            if interval < 10 * _RATE_INTERVAL:
                lane.rate += (done / interval - lane.rate) * _RATE_WEIGHT
                # Armed, the lane refuses or misses deadlines: its demand exceeds what it
                # serves even when a measure finds the queue empty for a moment (under a
                # retry storm it often does, and the hold-based pace then admitted waiters
                # that timed out: 3,800 of 14,000 admitted in 6 s).
                armed = now < lane.armed_until
                lane.busy = lane.busy + 1 if lane.waiting or armed else 0
            else:  # a stale interval (the pool was idle) says nothing of the pace
                lane.busy = 0

    async def _maintain(self) -> None:
        """Close connections idle past `max_idle` (above `min_size`); refill to `min_size`."""
        backoff = 0.1
        failures = 0
        while True:
            await asyncio.sleep(_MAINTENANCE_INTERVAL)
            self._shrink(time.monotonic())
            while self._size < self.min_size and not self.closed:
                self._size += 1
                try:
                    slot = await self._new_slot()
                except Exception as exc:
                    self._size -= 1
                    failures += 1
                    if failures & (failures - 1) == 0:  # the 1st, 2nd, 4th, 8th...: bounded
                        log.info(
                            "pool %s: refill failed (%s), %d attempt(s) so far",
                            self.name,
                            explain_connect_error(exc.__cause__ or exc, self.target),
                            failures,
                        )
                    await asyncio.sleep(random.uniform(0, backoff))
                    backoff = min(backoff * 2, _REFILL_BACKOFF_MAX)
                    continue
                if failures:
                    log.info("pool %s: refilled after %d failed attempt(s)", self.name, failures)
                backoff, failures = 0.1, 0
                self._put(slot)
            if failures and self._size >= self.min_size:
                # Callers' own connects refilled it first: the outage is over all the same,
                # and the next one counts its attempts from one.
                log.info("pool %s: connecting again after %d failed refill(s)", self.name, failures)
                backoff, failures = 0.1, 0

    def _shrink(self, now: float) -> None:
        if not self.max_idle:
            return
        cutoff = now - self.max_idle
        idle = self._idle
        excess = self._size - self.min_size
        while idle and excess > 0 and idle[0].released_at < cutoff:
            excess -= 1
            self._spawn(self._close_slot(idle.popleft()))

    # -- numbers ---------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Open connections (those being made are not counted)."""
        return len(self._slots)

    @property
    def idle(self) -> int:
        return len(self._idle)

    @property
    def in_use(self) -> int:
        return self._in_use

    @property
    def waiting(self) -> int:
        return self._waiting

    def saturated(self, coming: int = 0) -> float | None:
        """While a new read would be refused (its predicted wait past `acquire_timeout` on an
        armed lane, or `max_waiters` waiting), that predicted wait in seconds; else None.

        `coming`: requests let in ahead of it that have not reached the pool yet (they
        arrived in the same turn of the loop; their tasks have not run)."""
        if not (self._waiting or coming):
            return None
        lane = self._lanes["read"]
        if self._waiting < self.max_waiters and time.monotonic() > lane.armed_until:
            return None  # only an armed lane's forecast refuses
        predicted = self.predicted_wait(lane, coming)
        if (
            self._forecast_refuses(lane, predicted, self.acquire_timeout)
            or self._waiting >= self.max_waiters
        ):
            return predicted
        return None

    def forecasting(self) -> bool:
        """Whether reads are admitted by forecast now (the read lane is armed): only then
        do requests let in but not yet queued change what `saturated` answers."""
        return time.monotonic() <= self._lanes["read"].armed_until

    def lanes(self) -> list[Lane]:
        return list(self._lanes.values())
