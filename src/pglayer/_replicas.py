"""`ReplicaSet`: read replicas, their health and lag, and the choice of one for a read."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import asyncpg

from pglayer._errors import PglayerError
from pglayer._logs import Throttle, left_out

if TYPE_CHECKING:
    from pglayer._database import Database

__all__ = ["PRIMARY_POSITION_SQL", "REPLICA_HEALTH_SQL", "ReplicaHealth", "ReplicaSet"]

log = logging.getLogger("pglayer.replicas")

REOPEN_EVERY = 30.0  # seconds between attempts to open a replica that refused (see _open_one)
# What a probe fails with when the replica is gone or cut off; asyncpg's InternalClientError
# (a protocol state it cannot leave, seen as a standby restarted) is no InterfaceError.
_PROBE_FAILURES = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)
_CHECK_FAILED = Throttle()

# `lag`, the replica's own estimate: zero when everything received is replayed (after a
# restart the received position starts behind the replayed one), however long ago the last
# write was. It cannot see a replica that receives nothing any more (cut off from the
# primary: lag 0 for ever), so once the primary has been read `replayed` is compared with
# the primary's positions instead (`_Positions`).
REPLICA_HEALTH_SQL = """
SELECT pg_is_in_recovery() AS standby,
       (SELECT system_identifier FROM pg_control_system()) AS cluster,
       pg_last_wal_replay_lsn()::text AS replayed,
       CASE WHEN pg_last_wal_receive_lsn() <= pg_last_wal_replay_lsn() THEN 0
            ELSE extract(epoch FROM now() - pg_last_xact_replay_timestamp())
       END::float8 AS lag
"""
PRIMARY_POSITION_SQL = """
SELECT pg_current_wal_lsn()::text AS lsn,
       (SELECT system_identifier FROM pg_control_system()) AS cluster
"""


def _lsn(text: str) -> int:
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


class _Positions:
    """The primary's WAL position, read at each check and kept for a while."""

    def __init__(self, keep: float) -> None:
        self.keep = keep
        self._seen: deque[tuple[float, int]] = deque()  # (when asked, position), oldest first

    def add(self, asked: float, lsn: int) -> None:
        seen = self._seen
        seen.append((asked, lsn))
        while len(seen) > 1 and seen[1][0] < asked - self.keep:
            seen.popleft()

    def behind(self, replayed: int, now: float) -> tuple[float, bool] | None:
        """How long ago the primary was first seen past `replayed` (0: not seen past it),
        and whether a position kept is at or before `replayed`.

        With one, a lower bound on the replica's lag short by at most the time between two
        checks; without (behind every position kept: just after start, or for longer than
        they are kept), only a lower bound. None before the primary was ever read.
        """
        passed: float | None = None
        reached = False
        for asked, lsn in reversed(self._seen):
            if lsn <= replayed:
                reached = True
                break
            passed = asked
        if passed is None:
            return None if not self._seen else (0.0, True)
        return max(now - passed, 0.0), reached


@dataclass(frozen=True, slots=True)
class ReplicaHealth:
    name: str
    healthy: bool
    # "ok", "unreachable", "refused", "lagging", "not a standby", "another cluster", "unknown"
    reason: str
    lag_seconds: float | None


class ReplicaSet:
    """Checks each replica every `interval` seconds; hands out healthy ones round-robin."""

    def __init__(
        self,
        replicas: list[Database],
        *,
        max_lag: float,
        interval: float,
        primary: Database | None = None,
        read_your_writes: float | None = None,
    ) -> None:
        self.replicas = replicas
        self.primary = primary
        self.max_lag = max_lag
        self.interval = interval
        self.health: dict[str, ReplicaHealth] = {
            r.name: ReplicaHealth(r.name, False, "unknown", None) for r in replicas
        }
        self._turn = itertools.count()
        self._checker: asyncio.Task[None] | None = None
        # Kept past the lag bound, so that a replica behind all of them is lagging.
        self._positions = _Positions(keep=max_lag + 3 * interval)
        self._cluster: int | None = None  # the primary's system identifier, once read
        # Replicas behind every position kept: since when, at the latest.
        self._behind_since: dict[str, float] = {}
        self._refused: dict[str, float] = {}  # replicas that refused to open: when to try again
        self._clusters: dict[str, int] = {}  # each replica's system identifier, as last read
        # One connection per replica for its checks, outside its pool: a check must not
        # wait behind the reads (then a busy replica looks unreachable), and a replica that
        # stops answering is told apart from one whose connections are all busy.
        self._probes: dict[str, asyncpg.Connection[Any]] = {}
        # Not shorter than a second, whatever the interval: a replica slow under load for a
        # moment is not one that stopped answering (which has its reads failed over).
        self._probe_timeout = max(interval, 1.0)
        # A replica in rotation is at most this far behind: measured at most max_lag behind
        # (a lower bound, short by up to an interval), and until its next check.
        unseen = max_lag + 3 * interval
        window = unseen if read_your_writes is None else read_your_writes
        if window < unseen:
            log.warning(
                "PGLAYER_READ_YOUR_WRITES_WINDOW=%g is shorter than a replica in rotation may"
                " lag (PGLAYER_REPLICA_MAX_LAG + 3 x PGLAYER_REPLICA_CHECK_INTERVAL = %gs): a"
                " client may not read its own write",
                window,
                unseen,
            )
        # Whole seconds, one more: cookie jars that keep whole seconds expire it up to one early.
        max_age = math.ceil(window) + 1
        self.cookie = f"pglayer_rw=1; Max-Age={max_age}; Path=/; HttpOnly; SameSite=Lax".encode()
        self.secure_cookie = self.cookie + b"; Secure"  # for a request the server sees as https

    async def open(self) -> None:
        if self._checker is not None:  # opened already (while the primary was down)
            return
        # At once: one that does not answer costs the connect timeout, not one per replica.
        await asyncio.gather(*(self._open_one(r) for r in self.replicas))
        await self.check()
        self._checker = asyncio.create_task(self._check_forever())

    async def close(self, timeout: float | None = None) -> None:
        if self._checker is not None:
            self._checker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checker
            self._checker = None
        probes, self._probes = self._probes, {}
        for probe in probes.values():
            probe.terminate()
        await asyncio.gather(*(r.close(timeout) for r in self.replicas))

    async def _check_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check()
            except Exception:
                # A check that failed in a way not foreseen must not end the checks: the
                # replicas' health would stay as it was for good.
                count = _CHECK_FAILED.allow("check")
                if count is not None:
                    log.exception("replica check failed%s", left_out(count))

    async def check(self) -> None:
        """Refresh every replica's health now."""
        await self._read_primary()
        results = await asyncio.gather(*(self._check_one(r) for r in self.replicas))
        if self._cluster is None and len(set(self._clusters.values())) > 1:
            # The primary never read, and the replicas standbys of different servers: which
            # one holds its data is unknown, so none serves reads until the primary says.
            results = [
                h if not h.healthy else ReplicaHealth(h.name, False, "another cluster", None)
                for h in results
            ]
        for health in results:
            before = self.health.get(health.name)
            if before is None or before.reason == "unknown":  # its first check
                level, state = (
                    (logging.INFO, "in rotation")
                    if health.healthy
                    else (logging.WARNING, "out of rotation")
                )
                log.log(level, "replica %s is %s (%s)", health.name, state, health.reason)
            elif before.healthy != health.healthy:
                log.log(
                    logging.INFO if health.healthy else logging.WARNING,
                    "replica %s is %s (%s)",
                    health.name,
                    "back in rotation" if health.healthy else "out of rotation",
                    health.reason,
                )
            self.health[health.name] = health

    async def _read_primary(self) -> None:
        """Note the primary's WAL position; while it cannot be read, the last ones stand."""
        if self.primary is None:
            return
        asked = time.monotonic()
        try:
            row = await self.primary.run(
                lambda c: c.fetchrow(PRIMARY_POSITION_SQL, timeout=self.interval),
                retry=False,
                timeout=self.interval,
                bulkhead="read",
            )
        except PglayerError:
            return
        assert row is not None
        self._positions.add(asked, _lsn(row["lsn"]))
        self._cluster = row["cluster"]

    async def _open_one(self, replica: Database) -> bool:
        """Open `replica`'s pool; one it refuses is left closed, and tried again later."""
        try:
            await replica.open(wait=False)
        # Refused (a password, a database; the driver's reading of its URL's parameters):
        # not worth a retry a second, and never fatal to the app.
        except (PglayerError, asyncpg.ClientConfigurationError, ValueError) as exc:
            if replica.name not in self._refused:
                log.warning(
                    "replica %s cannot be opened (%s); reads use the primary; tried again"
                    " every %gs",
                    replica.name,
                    exc,
                    REOPEN_EVERY,
                )
            self._refused[replica.name] = time.monotonic() + REOPEN_EVERY
            return False
        self._refused.pop(replica.name, None)
        return True

    async def _check_one(self, replica: Database) -> ReplicaHealth:
        again = self._refused.get(replica.name)
        if again is not None and (time.monotonic() < again or not await self._open_one(replica)):
            return ReplicaHealth(replica.name, False, "refused", None)
        try:
            row = await self._probe(replica)
        except _PROBE_FAILURES:
            if self.health[replica.name].healthy:
                # It stopped answering: reads queued for its connections, or running on
                # them, would wait out their deadlines; they fail now and read the primary.
                replica._abandon()
            return ReplicaHealth(replica.name, False, "unreachable", None)
        if not self.health[replica.name].healthy:
            replica._answered()  # its pool connects again now, not after its cool-down
        if not row["standby"]:
            return ReplicaHealth(replica.name, False, "not a standby", None)
        if self._cluster is not None and row["cluster"] != self._cluster:
            # A standby of another server: whatever its lag, not the primary's data.
            return ReplicaHealth(replica.name, False, "another cluster", None)
        self._clusters[replica.name] = row["cluster"]
        lag = self._lag(replica.name, row)
        # NULL: behind, and nothing replayed since it started, so by how much is unknown.
        if lag is None or lag > self.max_lag:
            return ReplicaHealth(replica.name, False, "lagging", lag)
        return ReplicaHealth(replica.name, True, "ok", lag)

    def _lag(self, name: str, row: asyncpg.Record) -> float | None:
        """The replica's lag: from the primary's positions where they reach back to its own;
        behind all of them, the longest of how long it has been so and its own estimate (an
        upper bound, from its last replayed commit): just after start the positions go back
        no time at all, and a replica paused for minutes would look current."""
        estimate: float | None = row["lag"]
        if row["replayed"] is None:
            return estimate
        now = time.monotonic()
        behind = self._positions.behind(_lsn(row["replayed"]), now)
        if behind is None:
            return estimate
        seconds, reached = behind
        if reached:
            self._behind_since.pop(name, None)
            return seconds
        since = self._behind_since.setdefault(name, now - seconds)
        # No account (nothing replayed since it started): the positions' bound alone.
        return max(now - since, estimate or 0.0)

    async def _probe(self, replica: Database) -> asyncpg.Record:
        probe = self._probes.pop(replica.name, None)
        if probe is None or probe.is_closed():
            settings = replica.settings
            probe = await asyncpg.connect(
                settings.dsn(),
                timeout=min(settings.connect_timeout, self._probe_timeout),
                statement_cache_size=0,
                server_settings={"application_name": f"{settings.application_name}-check"},
            )
        try:
            row = await probe.fetchrow(REPLICA_HEALTH_SQL, timeout=self._probe_timeout)
        except BaseException:
            probe.terminate()
            raise
        self._probes[replica.name] = probe
        assert row is not None
        return row

    def healthy(self) -> list[Database]:
        """The replicas in rotation."""
        return [r for r in self.replicas if self.health[r.name].healthy]

    def choose(self) -> Database | None:
        """A healthy replica (round-robin), or None when there is none."""
        healthy = self.healthy()
        if not healthy:
            return None
        return healthy[next(self._turn) % len(healthy)]

    def behind(self, replica: Database) -> bool:
        """Whether `replica` was behind the primary at its last check by more than a check
        interval (in step, a lag measured from the primary's positions is at most one)."""
        lag = self.health[replica.name].lag_seconds
        return lag is None or lag > self.interval

    def mark_failed(self, replica: Database, *, behind: bool = False) -> None:
        """Take `replica` out of rotation until its next successful check: unreachable, or
        (`behind`) without a table or column a read needed, which the primary has."""
        reason, why = (
            ("lagging", "it has not replayed a table or column a read needed")
            if behind
            else ("unreachable", "a read failed on it")
        )
        if self.health[replica.name].healthy:
            log.warning("replica %s is out of rotation (%s)", replica.name, why)
        self.health[replica.name] = ReplicaHealth(replica.name, False, reason, None)
