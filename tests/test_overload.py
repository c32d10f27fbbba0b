"""Overload and contention: admission by predicted wait, adaptive LIFO, bulkheads, lock bounds."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import httpx
import pytest
from pglayer_shop.app import create_app
from pglayer_shop.settings import ShopSettings
from prometheus_client.parser import text_string_to_metric_families

from pglayer import (
    Connection,
    Database,
    IdempotencyKeys,
    LockTimeoutError,
    PoolOverloadedError,
    PoolTimeoutError,
    SerializationError,
)
from pglayer._observability import Observer, StatsRecorder
from pglayer._pool import Lane, Pool, Slot
from tests.conftest import asgi_client, backends, settings_for, wait_for


def _pool(db: Database) -> Pool:
    pool = db._pool
    assert pool is not None
    return pool


async def _hold(db: Database, seconds: float, times: int) -> None:
    """Teach the write lane's estimate: connections held `seconds` each."""
    for _ in range(times):
        async with db.connection():
            await asyncio.sleep(seconds)


async def test_admission_refuses_at_once_only_what_would_miss_its_deadline(db_url: str) -> None:
    async with Database(settings_for(db_url, min_size=1, max_size=1, refusal_delay=0)) as db:
        await _hold(db, 0.1, 3)
        pool = _pool(db)
        lane = pool.lane("write")
        assert 0.05 < lane.hold < 0.5
        async with db.connection():  # the only connection, held
            with pytest.raises(PoolTimeoutError):  # a missed deadline arms admission
                await pool.acquire(lane, timeout=0.05)
            # One ahead is about one hold: well inside a 5 s deadline, so it waits in line.
            first = asyncio.create_task(pool.acquire(lane, timeout=5.0))
            await wait_for(lambda: asyncio.sleep(0, lane.waiting == 1))
            predicted = pool.predicted_wait(lane)
            assert 2 * 0.05 < predicted < 2 * 0.5  # two holds of ~0.1 s ahead
            # A newcomer whose deadline is shorter than that is refused without waiting.
            with pytest.raises(PoolOverloadedError) as refused:
                await pool.acquire(lane, timeout=predicted / 2)
            assert refused.value.retry_after == pytest.approx(predicted)
            assert lane.refused == 1
            assert lane.waiting == 1
            assert lane.timeouts == 1
            # One whose deadline covers the predicted wait is admitted.
            second = asyncio.create_task(pool.acquire(lane, timeout=predicted * 10))
            await wait_for(lambda: asyncio.sleep(0, lane.waiting == 2))
            assert lane.refused == 1
        for task in (first, second):
            slot: Slot = await task
            pool.release(slot, 0.0)
        assert db.stats().bulkheads["write"].refused == 1
        assert db.stats().requests_shed == 1


async def test_a_cold_start_refuses_nothing_until_a_pace_is_measured(db_url: str) -> None:
    async with Database(settings_for(db_url, min_size=1, max_size=4, refusal_delay=0)) as db:
        pool = _pool(db)
        lane = pool.lane("write")
        await _hold(db, 0.4, 1)  # a cold first connection
        assert pool.predicted_wait(lane) == 0.0  # one hold is no pace to go by: admitted
        await _hold(db, 0.0, lane.cap - 1)
        assert lane.hold < 0.4 * 2 / lane.cap  # the mean of the first holds, not the first
        lane.rate = 0.0  # no busy interval measured yet
        assert pool.predicted_wait(lane) == 0.0
        lane.rate = 1.0  # as the clock measures it once the lane has been busy
        assert pool.predicted_wait(lane) > 0


async def test_a_forecast_refuses_only_once_a_deadline_has_been_missed(db_url: str) -> None:
    async with Database(settings_for(db_url, min_size=1, max_size=1, refusal_delay=0)) as db:
        pool = _pool(db)
        lane = pool.lane("write")
        async with db.connection():  # the only connection, held
            lane.samples, lane.hold, lane.rate = lane.cap, 10.0, 0.1  # forecast: 10 s each
            # A cold flood: the forecast says it would miss its 0.2 s deadline; it waits.
            with pytest.raises(PoolTimeoutError):
                await pool.acquire(lane, timeout=0.2)
            assert (lane.refused, lane.timeouts) == (0, 1)
            lane.rate = 0.1  # the clock's measures meanwhile decay it; as measured
            # Proved right: now what the forecast says would miss is refused at once.
            with pytest.raises(PoolOverloadedError):
                await pool.acquire(lane, timeout=0.2)
            assert (lane.refused, lane.timeouts) == (1, 1)


async def test_under_a_standing_queue_the_newest_waiter_is_served_first(db_url: str) -> None:
    async with Database(settings_for(db_url, min_size=1, max_size=1)) as db:
        pool = _pool(db)
        lane = pool.lane("write")
        held = await pool.acquire(lane)
        old = asyncio.create_task(pool.acquire(lane, timeout=1.0))
        await asyncio.sleep(0.85)  # the oldest has used most of its wait
        new = asyncio.create_task(pool.acquire(lane, timeout=5.0))
        await wait_for(lambda: asyncio.sleep(0, lane.waiting == 2))
        pool.release(held, 0.0)
        served = await new
        assert not old.done()
        with pytest.raises(PoolTimeoutError):
            await old  # its deadline came first
        pool.release(served, 0.0)
        assert lane.timeouts == 1


async def test_while_admission_refuses_a_standing_queue_stays_fifo(db_url: str) -> None:
    async with _one_connection_held(db_url) as (pool, lane, held):
        lane.armed_until = time.monotonic() + 60  # a deadline was missed: forecasts refuse
        old = asyncio.create_task(pool.acquire(lane, timeout=5.0))
        new = asyncio.create_task(pool.acquire(lane, timeout=5.0))
        await wait_for(lambda: asyncio.sleep(0, lane.waiting == 2))
        lane.waiters[0].standing_at = 0.0  # the oldest is past its standing point
        pool.release(held, 0.0)
        served = await old  # admission bounds the queue: what it admitted goes first
        assert not new.done()
        pool.release(served, 0.0)
        pool.release(await new, 0.0)
        assert lane.timeouts == 0


@contextlib.asynccontextmanager
async def _one_connection_held(db_url: str) -> AsyncIterator[tuple[Pool, Lane, Slot]]:
    """A pool whose only connection is held, by the write lane, whose waiters queue."""
    async with Database(settings_for(db_url, min_size=1, max_size=1, refusal_delay=0)) as db:
        pool = _pool(db)
        lane = pool.lane("write")
        yield pool, lane, await pool.acquire(lane)


def _measured(lane: Lane, rate: float, hold: float = 1.0, busy: int = 10**6) -> None:
    """Set the lane's estimate as the clock would have measured it, armed by a missed
    deadline."""
    lane.samples, lane.hold, lane.rate, lane.busy = lane.cap, hold, rate, busy
    lane.armed_until = time.monotonic() + 60


async def test_at_the_admission_limit_the_oldest_waiter_is_still_served_first(db_url: str) -> None:
    async with _one_connection_held(db_url) as (pool, lane, held):
        _measured(lane, rate=0.625)  # a connection every 1.6 s
        old = asyncio.create_task(pool.acquire(lane, timeout=2.0))  # predicted 1.6 s of its 2
        await wait_for(lambda: asyncio.sleep(0, lane.waiting == 1))
        await asyncio.sleep(1.65)  # past 80% of its wait, still within what it was predicted
        lane.rate = 0.625  # as measured (with no releases the clock's measure decays it)
        new = asyncio.create_task(pool.acquire(lane, timeout=60.0))
        await wait_for(lambda: asyncio.sleep(0, lane.waiting == 2))
        pool.release(held, 0.0)
        served = await old  # FIFO: the queue is as long as admission predicted, not standing
        assert not new.done()
        pool.release(served, 0.0)
        pool.release(await new, 0.0)
        assert lane.timeouts == 0


async def test_after_a_second_of_queue_the_measured_rate_alone_is_the_pace(db_url: str) -> None:
    async with _one_connection_held(db_url) as (pool, lane, held):
        waiter = asyncio.create_task(pool.acquire(lane, timeout=5.0))
        await wait_for(lambda: asyncio.sleep(0, lane.busy >= 3))  # measures that found a queue
        _measured(lane, rate=10.0, hold=0.001, busy=9)  # holds say 1,000/s; the rate 10/s
        assert pool.predicted_wait(lane) == pytest.approx(2 / 1000)  # the faster, for now
        lane.busy = 10
        assert pool.predicted_wait(lane) == pytest.approx(2 / 10)
        pool.release(held, 0.0)
        pool.release(await waiter, 0.0)


async def test_while_armed_the_measured_rate_is_the_pace_even_with_no_queue_at_a_measure(
    db_url: str,
) -> None:
    async with _one_connection_held(db_url) as (pool, lane, held):
        _measured(lane, rate=10.0, hold=0.001, busy=0)  # armed; nobody waits
        await wait_for(lambda: asyncio.sleep(0, lane.busy >= 10))  # the clock's measures
        assert lane.waiting == 0
        assert pool.predicted_wait(lane) == pytest.approx(1 / lane.rate)
        lane.armed_until = 0.0
        await wait_for(lambda: asyncio.sleep(0, lane.busy == 0))  # unarmed: a new start
        pool.release(held, 0.0)


async def test_admitted_waiters_that_time_out_shorten_the_wait_admission_allows(
    db_url: str,
) -> None:
    async with _one_connection_held(db_url) as (pool, lane, held):
        _measured(lane, rate=10.0)  # one ahead at most: a newcomer is predicted 0.1 s
        with pytest.raises(PoolTimeoutError):
            await pool.acquire(lane, timeout=0.15)  # admitted, then missed its deadline
        assert lane.admit == pytest.approx(0.99)
        lane.rate = 10.0  # as measured (with no releases the clock's measure decays it)
        with pytest.raises(PoolOverloadedError):
            await pool.acquire(lane, timeout=0.1005)  # 0.1 s is more than 99% of it
        lane.rate = 10.0
        waiter = asyncio.create_task(pool.acquire(lane, timeout=5.0))
        await wait_for(lambda: asyncio.sleep(0, lane.waiting == 1))
        pool.release(held, 0.0)
        pool.release(await waiter, 0.0)  # a waiter served wins back a hundredth of a step
        assert lane.admit == pytest.approx(0.9901)
        lane.armed_until = 0.0
        lane.arm(time.monotonic())  # a new episode starts from the whole deadline
        assert lane.admit == 1.0


async def test_a_bulkhead_at_its_cap_waits_while_others_take_connections(db_url: str) -> None:
    settings = settings_for(db_url, min_size=4, max_size=4, bulkheads={"write": 2})
    async with Database(settings) as db:
        pool = _pool(db)
        write, read = pool.lane("write"), pool.lane("read")
        held = [await pool.acquire(write), await pool.acquire(write)]
        assert pool.take(write) is None  # at its cap, with idle connections left
        with pytest.raises(PoolTimeoutError):
            await pool.acquire(write, timeout=0.2)
        reads = [await pool.acquire(read), await pool.acquire(read)]  # reads still get theirs
        assert (write.in_use, read.in_use, pool.in_use) == (2, 2, 4)
        stats = db.stats().bulkheads
        assert (stats["write"].cap, stats["write"].in_use, stats["write"].acquire_timeouts) == (
            2,
            2,
            1,
        )
        assert (stats["read"].cap, stats["read"].in_use) == (4, 2)
        for slot in held + reads:
            pool.release(slot, 0.0)
        assert (write.in_use, read.in_use, pool.in_use) == (0, 0, 0)


async def test_the_default_bulkheads_keep_a_quarter_of_the_pool_for_reads(db_url: str) -> None:
    async with Database(settings_for(db_url, min_size=1, max_size=8)) as db:
        caps = {name: b.cap for name, b in db.stats().bulkheads.items()}
    assert caps == {"read": 8, "write": 6, "stream": 2}


async def test_a_bulkhead_without_a_cap_is_said_once_at_its_first_use(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING", logger="pglayer")
    settings = settings_for(db_url, max_size=4, bulkheads={"reports": 1})
    async with Database(settings) as db:
        for _ in range(3):
            await db.read(lambda c: c.fetchval("SELECT 1"), bulkhead="reprots")
        await db.read(lambda c: c.fetchval("SELECT 1"), bulkhead="reports")
    said = [r.getMessage() for r in caplog.records if "has no cap" in r.getMessage()]
    assert len(said) == 1, said
    assert "'reprots'" in said[0]
    assert "reports" in said[0].split("names", 1)[1]  # the names it knows, to compare


async def test_writes_stuck_on_a_lock_leave_reads_their_connections(db_url: str) -> None:
    async with Database(settings_for(db_url, min_size=4, max_size=4)) as db:
        await db.run(lambda c: c.execute("CREATE TABLE hot (id int PRIMARY KEY)"))
        await db.run(lambda c: c.execute("INSERT INTO hot VALUES (1)"))
        holder: asyncpg.Connection[Any] = await asyncpg.connect(db_url)
        await holder.execute("BEGIN; SELECT 1 FROM hot WHERE id = 1 FOR UPDATE")
        try:
            stuck = [
                asyncio.create_task(
                    db.run_in_transaction(
                        lambda c: c.execute("UPDATE hot SET id = 1 WHERE id = 1"), retry=False
                    )
                )
                for _ in range(6)
            ]
            await wait_for(lambda: asyncio.sleep(0, _pool(db).lane("write").in_use == 3))
            for _ in range(20):  # reads keep the quarter writes may not take
                assert await db.read(lambda c: c.fetchval("SELECT 1"), timeout=0.5) == 1
        finally:
            await holder.close()
        # Once the lock is gone the writes go through (or their waiters' deadline passed).
        for outcome in await asyncio.gather(*stuck, return_exceptions=True):
            assert outcome == "UPDATE 1" or isinstance(outcome, PoolTimeoutError), outcome


async def test_a_lock_held_past_the_bound_is_busy_and_gives_the_connection_back(
    db_url: str,
) -> None:
    async with Database(settings_for(db_url, min_size=1, max_size=2)) as db:
        await db.run(lambda c: c.execute("CREATE TABLE hot (id int PRIMARY KEY)"))
        await db.run(lambda c: c.execute("INSERT INTO hot VALUES (1)"))
        holder: asyncpg.Connection[Any] = await asyncpg.connect(db_url)
        await holder.execute("BEGIN; SELECT 1 FROM hot WHERE id = 1 FOR UPDATE")
        try:
            with pytest.raises(LockTimeoutError) as info:
                await db.run_in_transaction(
                    lambda c: c.execute("UPDATE hot SET id = 1 WHERE id = 1"), lock_timeout=0.2
                )
            assert info.value.sqlstate == "55P03"
            # Still locked by the other connection; ours are all back in the pool.
            locked = await holder.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'transactionid' AND granted"
                " AND pid = pg_backend_pid()"
            )
            assert locked == 1
            assert db.stats().in_use == 0
            assert _pool(db).lane("write").locked_at > 0  # its bulkhead now counts as stuck
        finally:
            await holder.close()


_BOUNDED_UPDATE = """
CREATE FUNCTION touch_hot(lock_ms integer) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('lock_timeout', lock_ms::text, true);
    UPDATE hot SET id = 1 WHERE id = 1;
END $$
"""


async def test_a_one_statement_write_gets_its_bound_and_is_busy_past_it(db_url: str) -> None:
    async with Database(settings_for(db_url, min_size=1, max_size=2)) as db:
        await db.run(lambda c: c.execute("CREATE TABLE hot (id int PRIMARY KEY)"))
        await db.run(lambda c: c.execute("INSERT INTO hot VALUES (1)"))
        await db.run(lambda c: c.execute(_BOUNDED_UPDATE))
        seen: list[int | None] = []

        async def touch(conn: Connection) -> None:
            seen.append(conn.lock_timeout_ms)
            await conn.execute("SELECT touch_hot($1)", conn.lock_timeout_ms)

        await db.run(touch, lock_timeout=0.25)
        assert seen == [250]
        assert await db.run(lambda c: asyncio.sleep(0, c.lock_timeout_ms)) is None
        holder: asyncpg.Connection[Any] = await asyncpg.connect(db_url)
        await holder.execute("BEGIN; SELECT 1 FROM hot WHERE id = 1 FOR UPDATE")
        try:
            with pytest.raises(LockTimeoutError):
                await db.run(touch, retry=False, lock_timeout=0.2)
            assert db.stats().in_use == 0
            assert _pool(db).lane("write").locked_at > 0  # stuck, as a bounded transaction
        finally:
            await holder.close()
        await db.run(touch, lock_timeout=0.2)  # it went through: the lane is not stuck
        assert _pool(db).lane("write").locked_at == 0


async def _bounded_write(db: Database) -> int:
    """A write transaction with a 0.2 s lock bound."""
    return await db.run_in_transaction(lambda c: c.fetchval("SELECT 1"), lock_timeout=0.2)


async def test_a_lock_bound_also_bounds_the_wait_for_a_connection_stuck_on_a_lock(
    db_url: str,
) -> None:
    settings = settings_for(db_url, min_size=1, max_size=1, acquire_timeout=30)
    async with Database(settings) as db, db.connection():  # the only connection, held
        _pool(db).lane("write").locked_at = time.monotonic()  # a write hit its bound just now
        waited = asyncio.get_running_loop().time()
        with pytest.raises(LockTimeoutError) as busy:  # it waited on the lock: busy
            await _bounded_write(db)
        cause = busy.value.__cause__
        assert cause is None or isinstance(cause, PoolOverloadedError)  # refused at once
        # Not a pool too small: its acquire-timeout count (and alert) stays put.
        assert db.stats().acquire_timeouts == 0
        # Refused after the 0.2 s bound, not the 30 s acquire deadline (slack for a busy CI).
        assert asyncio.get_running_loop().time() - waited < 10


async def test_waiters_queued_before_a_lane_gets_stuck_stop_at_their_lock_bound(
    db_url: str,
) -> None:
    async with Database(settings_for(db_url, min_size=1, max_size=1, acquire_timeout=30)) as db:
        pool, lane = _pool(db), _pool(db).lane("write")
        async with db.connection():  # the only connection, held
            bounded = asyncio.create_task(_bounded_write(db))
            unbounded = asyncio.create_task(db.run(lambda c: c.fetchval("SELECT 2")))
            await wait_for(lambda: asyncio.sleep(0, lane.waiting == 2))
            assert not lane.locked_at
            pool.stuck(lane)  # as when another write of the lane hits its lock bound
            stuck_at = asyncio.get_running_loop().time()
            with pytest.raises(LockTimeoutError):
                await bounded
            # At its 0.2 s bound, not the 30 s acquire deadline (slack for a busy CI).
            assert asyncio.get_running_loop().time() - stuck_at < 10
            assert lane.waiting == 1  # no bound: it keeps its place
            assert not unbounded.done()
        assert await unbounded == 2


async def test_a_waiter_whose_bound_ended_is_not_handed_the_connection_that_comes_free(
    db_url: str,
) -> None:
    settings = settings_for(db_url, min_size=1, max_size=1, acquire_timeout=30)
    async with Database(settings) as db:
        pool = _pool(db)
        lane = pool.lane("write")
        held = await pool.acquire(lane)
        late = asyncio.create_task(_bounded_write(db))
        await wait_for(lambda: asyncio.sleep(0, lane.waiting == 1))
        await asyncio.sleep(0.3)  # its bound is over; the clock would end its wait soon
        # A write of the lane hits its lock bound and gives its connection back at once,
        # as `Database` does: the waiter's wait was on that lock, it must not take it.
        pool.stuck(lane)
        pool.release(held, 0.3)
        with pytest.raises(LockTimeoutError):
            await late
        assert lane.in_use == 0


async def test_a_waiter_that_gets_a_connection_after_its_lane_got_stuck_gets_its_bound_left(
    db_url: str,
) -> None:
    async with Database(settings_for(db_url, min_size=1, max_size=1, acquire_timeout=30)) as db:
        pool, lane = _pool(db), _pool(db).lane("write")
        held = await pool.acquire(lane)
        write = asyncio.create_task(
            db.run(lambda c: asyncio.sleep(0, c.lock_timeout_ms), lock_timeout=5.0)
        )
        await wait_for(lambda: asyncio.sleep(0, lane.waiting == 1))
        await asyncio.sleep(0.3)
        pool.stuck(lane)  # another write of the lane hit its bound while this one waited
        pool.release(held, 0.3)
        left = await write
    assert left is not None
    assert 0 < left <= 4700  # 5 s less its wait in line


async def _bound_in_the_transaction(db: Database) -> int | None:
    setting = await db.run_in_transaction(
        lambda c: c.fetchval("SHOW lock_timeout"), lock_timeout=5.0
    )
    return int(setting.removesuffix("ms"))


async def _bound_for_one_statement(db: Database) -> int | None:
    return await db.run(lambda c: asyncio.sleep(0, c.lock_timeout_ms), lock_timeout=5.0)


@pytest.mark.parametrize(
    "bound_left",
    [_bound_in_the_transaction, _bound_for_one_statement],
    ids=["with BEGIN", "on the connection, for one statement"],
)
async def test_what_is_left_of_a_stuck_lanes_lock_bound_after_the_acquire_goes_with_the_work(
    db_url: str, bound_left: Callable[[Database], Awaitable[int | None]]
) -> None:
    async with Database(settings_for(db_url, min_size=1, max_size=1)) as db:
        pool = _pool(db)
        pool.lane("write").locked_at = time.monotonic()
        held = await pool.acquire(pool.lane("write"))
        asyncio.get_running_loop().call_later(0.3, pool.release, held, 0.3)
        milliseconds = await bound_left(db)
    assert milliseconds is not None
    assert 0 < milliseconds <= 4700  # 5 s less the wait for the connection


async def test_a_queue_of_writes_no_lock_held_up_waits_its_acquire_deadline_and_keeps_its_bound(
    db_url: str,
) -> None:
    async with Database(settings_for(db_url, min_size=1, max_size=1, acquire_timeout=30)) as db:
        pool = _pool(db)
        pool.lane("write").locked_at = time.monotonic() - 5  # the last lock trouble is old
        held = await pool.acquire(pool.lane("write"))
        asyncio.get_running_loop().call_later(0.5, pool.release, held, 0.5)
        setting = await db.run_in_transaction(
            lambda c: c.fetchval("SHOW lock_timeout"), lock_timeout=0.3
        )
    assert setting == "300ms"  # waited 0.5 s in line, longer than the bound, and served


async def test_a_commit_in_the_bulkhead_ends_its_stuck_state(db_url: str) -> None:
    async with Database(settings_for(db_url)) as db:
        lane = _pool(db).lane("write")
        lane.locked_at = time.monotonic()  # a write hit its lock bound just now
        await db.run_in_transaction(lambda c: c.fetchval("SELECT 1"), lock_timeout=1.0)
        assert lane.locked_at == 0.0  # a commit since: the line moves, nothing is stuck


async def test_a_replay_gets_what_is_left_of_the_first_attempts_lock_bound(db_url: str) -> None:
    settings = settings_for(db_url, retry_initial_wait=0.01, retry_max_wait=0.01)
    seen: list[int] = []

    async def conflict_once(conn: Any) -> None:
        seen.append(int((await conn.fetchval("SHOW lock_timeout")).removesuffix("ms")))
        if len(seen) == 1:
            await asyncio.sleep(0.5)
            raise SerializationError()

    async with Database(settings) as db:
        _pool(db).lane("write").locked_at = time.monotonic()  # stuck on a lock lately
        await db.run_in_transaction(conflict_once, lock_timeout=5.0)
    first, replay = seen
    assert 4800 <= first <= 5000
    assert replay <= first - 500  # the half second the first attempt used is gone


def test_a_refusal_pauses_a_share_of_the_predicted_wait_within_bounds() -> None:
    async def dues() -> list[float]:
        pool = await _pool_without_connections()
        now = time.monotonic()
        paused = [
            pool.pace(0.01),  # a short predicted wait: the least pause
            pool.pace(2.0),  # a fifth of it
            pool.pace(60.0),  # at most a second
            pool.pace(60.0, deadline=now + 0.1),  # never past the request's deadline
        ]
        pool.acquire_timeout = 0.6
        paused.append(pool.pace(60.0))  # never more than half the wait it spares
        assert pool.pace(1.0, deadline=now - 1) is None  # the deadline has passed
        due = {id(f): d - now for d, _, f in pool._paced}
        await pool.close(1)
        assert all(f is not None and f.done() for f in paused)  # closing answers them
        return [due[id(f)] for f in paused]

    least, share, most, capped, halved = asyncio.run(dues())
    assert least == pytest.approx(0.025, abs=0.01)
    assert share == pytest.approx(0.4, abs=0.01)
    assert most == pytest.approx(1.0, abs=0.01)
    assert capped == pytest.approx(0.1, abs=0.01)
    assert halved == pytest.approx(0.3, abs=0.01)


def test_under_a_storm_refusals_are_paced_at_the_rate_the_pool_serves() -> None:
    async def pauses() -> tuple[float, float]:
        pool = await _pool_without_connections()
        lane = pool.lane("read")
        lane.rate, lane.busy = 100.0, 0  # a pace, not yet measured over a busy second
        now = time.monotonic()
        for _ in range(20):
            pool.pace(0.01)
        untrusted = pool.pace(0.01)
        lane.busy = 10**6
        paced = pool.pace(0.01)  # 21 paused, a connection free every 10 ms
        due = {id(f): d - now for d, _, f in pool._paced}
        await pool.close(1)
        return due[id(untrusted)], due[id(paced)]

    untrusted, paced = asyncio.run(pauses())
    assert untrusted == pytest.approx(0.025, abs=0.01)
    assert paced == pytest.approx(0.21, abs=0.01)


async def _pool_without_connections() -> Pool:
    """A started pool that never connects: for what it decides, not what it lends."""
    pool = Pool(
        _never_connect, name="p", min_size=0, max_size=1, max_waiters=1,
        acquire_timeout=4, query_timeout=1, max_idle=0, connect_timeout=1,
        observer=Observer("p", StatsRecorder()), refusal_delay=0.025,
    )  # fmt: skip
    await pool.start()
    return pool


async def _never_connect() -> Any:
    raise AssertionError("no connection expected")


async def _an_order(client: httpx.AsyncClient) -> dict[str, int]:
    """The body of an order that goes through: a funded user, a product in stock."""
    user = (await client.post("/users", json={"name": "A", "email": "a@example.com"})).json()
    await client.post(f"/accounts/{user['id']}/deposits", json={"amount": "100.00"})
    product = (
        await client.post("/products", json={"name": "P", "price": "1.00", "stock": 5})
    ).json()
    return {"user_id": user["id"], "product_id": product["id"], "quantity": 1}


async def _lock_product(db_url: str, product_id: int) -> asyncpg.Connection[Any]:
    """Another connection holding the product's row lock until it is closed."""
    holder: asyncpg.Connection[Any] = await asyncpg.connect(db_url)
    await holder.execute(f"BEGIN; SELECT 1 FROM products WHERE id = {product_id} FOR UPDATE")
    return holder


@pytest.mark.parametrize("key", [None, "order-on-a-locked-row"])
async def test_an_order_on_a_locked_product_is_busy_with_retry_after(
    db: Database, db_url: str, db_name: str, admin: asyncpg.Connection[Any], key: str | None
) -> None:
    app = create_app(db=db, settings=ShopSettings(admin_token=None, write_lock_timeout=0.2))
    async with app.router.lifespan_context(app), asgi_client(app) as client:
        order = await _an_order(client)
        holder = await _lock_product(db_url, order["product_id"])
        try:
            headers = {"Idempotency-Key": key} if key else {}
            response = await client.post("/orders", json=order, headers=headers)
        finally:
            await holder.close()
        assert response.status_code == 503
        assert response.json()["code"] == "busy"
        assert int(response.headers["retry-after"]) >= 1
        assert db.stats().in_use == 0
        assert not [b for b in await backends(admin, db_name) if "transaction" in b["state"]]
        # Once the row is free the same order goes through.
        assert (await client.post("/orders", json=order, headers=headers)).status_code == 201


async def test_a_deposit_to_a_locked_account_is_busy_within_the_write_bound(
    db: Database, db_url: str
) -> None:
    app = create_app(db=db, settings=ShopSettings(admin_token=None, write_lock_timeout=0.2))
    async with app.router.lifespan_context(app), asgi_client(app) as client:
        user = (await _an_order(client))["user_id"]
        holder: asyncpg.Connection[Any] = await asyncpg.connect(db_url)
        await holder.execute(f"BEGIN; SELECT 1 FROM accounts WHERE user_id = {user} FOR UPDATE")
        try:
            started = time.monotonic()
            response = await client.post(f"/accounts/{user}/deposits", json={"amount": "5.00"})
            waited = time.monotonic() - started
        finally:
            await holder.close()
        assert (response.status_code, response.json()["code"]) == (503, "busy")
        assert int(response.headers["retry-after"]) >= 1
        assert waited < 2.0  # the 0.2 s write bound, not the 5 s lock timeout (slack for CI)
        account = (await client.get(f"/accounts/{user}")).json()
        assert account["balance"] == "100.00"  # nothing deposited


async def test_deposits_queued_on_a_locked_account_all_end_within_their_bound(
    db_url: str,
) -> None:
    # Each is one UPDATE in a bounded transaction: the second in line waits for the tuple
    # lock, then for the holder; the bound's statement_timeout ends both waits together.
    bound = 1.0
    db = Database(settings_for(db_url, min_size=1, max_size=8))
    app = create_app(db=db, settings=ShopSettings(admin_token=None, write_lock_timeout=bound))
    async with app.router.lifespan_context(app), asgi_client(app) as client:
        user = (await _an_order(client))["user_id"]
        holder: asyncpg.Connection[Any] = await asyncpg.connect(db_url)
        await holder.execute(f"BEGIN; SELECT 1 FROM accounts WHERE user_id = {user} FOR UPDATE")

        async def deposit() -> tuple[int, str, float]:
            started = time.monotonic()
            response = await client.post(f"/accounts/{user}/deposits", json={"amount": "5.00"})
            return response.status_code, response.json()["code"], time.monotonic() - started

        try:
            outcomes = await asyncio.gather(*(deposit() for _ in range(4)))
        finally:
            await holder.close()
    assert [(status, code) for status, code, _ in outcomes] == [(503, "busy")] * 4
    # About 1 s each; twice the bound would be 2 s (slack for a busy CI).
    assert max(seconds for _, _, seconds in outcomes) < 1.6 * bound


async def test_a_lock_bounded_transaction_bounds_its_statements_too(db: Database) -> None:
    shown = await db.run_in_transaction(
        lambda c: c.fetchval("SELECT current_setting('statement_timeout')"), lock_timeout=0.5
    )
    assert shown == "550ms"  # the bound, and a tenth for the work after a wait
    plain = await db.run_in_transaction(
        lambda c: c.fetchval("SELECT current_setting('statement_timeout')")
    )
    assert plain == "10s"  # only inside the bounded transaction


@pytest.mark.parametrize("keyed", [(), (0, 1, 2, 3), (0,)], ids=["keyless", "keyed", "mixed"])
async def test_orders_queued_on_a_locked_product_all_end_within_their_bound(
    db_url: str, keyed: tuple[int, ...]
) -> None:
    # PostgreSQL's lock_timeout bounds each lock wait; a row with a queue of waiters is two
    # waits (tuple lock, then the holder's transaction), so without care the second order in
    # line waits twice the bound.
    bound = 1.0
    db = Database(settings_for(db_url, min_size=1, max_size=8))
    app = create_app(db=db, settings=ShopSettings(admin_token=None, write_lock_timeout=bound))
    async with app.router.lifespan_context(app), asgi_client(app) as client:
        order = await _an_order(client)
        holder = await _lock_product(db_url, order["product_id"])

        async def place(n: int) -> tuple[int, float]:
            # A keyed order is its own transaction (not combined with others): it queues on
            # the same row, and must bound its two lock waits together too.
            headers = {"Idempotency-Key": f"queued-{n}"} if n in keyed else {}
            started = time.monotonic()
            response = await client.post("/orders", json=order, headers=headers)
            return response.status_code, time.monotonic() - started

        try:
            outcomes = await asyncio.gather(*(place(n) for n in range(4)))
        finally:
            await holder.close()
    assert [status for status, _ in outcomes] == [503] * 4
    # About 1 s each; twice the bound would be 2 s (slack for a busy CI).
    assert max(seconds for _, seconds in outcomes) < 1.6 * bound


async def test_a_refusal_before_routing_carries_the_predicted_wait(db_url: str) -> None:
    db = Database(
        settings_for(db_url, min_size=1, max_size=1, acquire_timeout=0.5, refusal_delay=0)
    )
    app = create_app(db=db, settings=ShopSettings(admin_token=None))
    async with app.router.lifespan_context(app), asgi_client(app) as client:
        pool = _pool(db)
        read = pool.lane("read")
        # As if each read held its connection 2 s: a pace of one every 2 s.
        read.hold, read.samples, read.rate = 2.0, read.cap, 0.5
        read.armed_until = time.monotonic() + 60  # as after a missed deadline
        async with db.connection():  # the only connection, held
            waiter = asyncio.create_task(pool.acquire(pool.lane("read"), timeout=30))
            await wait_for(lambda: asyncio.sleep(0, pool.waiting == 1))
            shed = await client.get("/users/1")
            live = await client.get("/health/live")
        pool.release(await waiter, 0.0)
    assert shed.status_code == 503
    assert shed.json()["code"] == "overloaded"
    assert shed.headers["retry-after"] == "4"  # two reads ahead, 2 s each, one connection
    assert live.status_code == 200


async def test_bulkheads_are_in_admin_stats_and_metrics(db: Database) -> None:
    app = create_app(db=db, settings=ShopSettings(admin_token="t"))
    async with app.router.lifespan_context(app), asgi_client(app) as client:
        stats = await client.get("/admin/db-stats", headers={"Authorization": "Bearer t"})
        text = (await client.get("/metrics")).text
    write = stats.json()["pools"]["primary"]["bulkheads"]["write"]
    assert set(write) == {"cap", "in_use", "waiting", "refused", "acquire_timeouts", "hold_seconds"}
    names = {
        (s.name, s.labels.get("bulkhead"))
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    for series in ("cap", "in_use", "waiting", "refused_total", "acquire_timeouts_total"):
        assert (f"pglayer_bulkhead_{series}", "write") in names


async def test_expiry_deletes_only_expired_keys(db: Database) -> None:
    await db.run(
        lambda c: c.execute(
            """
            INSERT INTO pglayer_idempotency_keys (scope, key, request_hash, expires_at)
            SELECT 'orders', 'old-' || g, 'h', now() - interval '1 day'
              FROM generate_series(1, 1200) g
            UNION ALL
            SELECT 'orders', 'new-' || g, 'h', now() + interval '23 hours'
              FROM generate_series(1, 30) g
            """
        )
    )
    assert await IdempotencyKeys(ttl=86_400).expire(db, batch=500) == 1200
    left = await db.run(lambda c: c.fetch("SELECT key FROM pglayer_idempotency_keys"))
    assert sorted(r["key"] for r in left) == sorted(f"new-{g}" for g in range(1, 31))


async def test_a_key_resent_after_expiry_makes_a_new_order(client: httpx.AsyncClient) -> None:
    user = (await client.post("/users", json={"name": "B", "email": "b@example.com"})).json()
    await client.post(f"/accounts/{user['id']}/deposits", json={"amount": "100.00"})
    product = (
        await client.post("/products", json={"name": "Q", "price": "1.00", "stock": 5})
    ).json()
    order = {"user_id": user["id"], "product_id": product["id"], "quantity": 1}
    headers = {"Idempotency-Key": "k-expiring"}
    first = await client.post("/orders", json=order, headers=headers)
    replay = await client.post("/orders", json=order, headers=headers)
    assert replay.headers.get("idempotent-replayed") == "true"
    assert replay.json()["id"] == first.json()["id"]
    app: Any = client._transport.app  # type: ignore[attr-defined]
    db: Database = app.state.pglayer_database
    await db.run(
        lambda c: c.execute(
            "UPDATE pglayer_idempotency_keys SET expires_at = now() - interval '1 hour'"
            " WHERE key = 'k-expiring'"
        )
    )
    again = await client.post("/orders", json=order, headers=headers)
    assert again.status_code == 201
    assert "idempotent-replayed" not in again.headers
    assert again.json()["id"] != first.json()["id"]
