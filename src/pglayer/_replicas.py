"""`ReplicaSet`: read replicas, their health and lag, and the choice of one for a read."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pglayer._errors import PglayerError

if TYPE_CHECKING:
    from pglayer._database import Database

__all__ = ["REPLICA_HEALTH_SQL", "ReplicaHealth", "ReplicaSet"]

log = logging.getLogger("pglayer.replicas")

# Caught up (everything received is replayed): no lag, however long ago the last write was.
REPLICA_HEALTH_SQL = """
SELECT pg_is_in_recovery() AS standby,
       CASE WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0
            ELSE extract(epoch FROM now() - pg_last_xact_replay_timestamp())
       END::float8 AS lag
"""


@dataclass(frozen=True, slots=True)
class ReplicaHealth:
    name: str
    healthy: bool
    reason: str  # "ok", "unreachable", "lagging", "not a standby", "unknown"
    lag_seconds: float | None


class ReplicaSet:
    """Checks each replica every `interval` seconds; hands out healthy ones round-robin."""

    def __init__(self, replicas: list[Database], *, max_lag: float, interval: float) -> None:
        self.replicas = replicas
        self.max_lag = max_lag
        self.interval = interval
        self.health: dict[str, ReplicaHealth] = {
            r.name: ReplicaHealth(r.name, False, "unknown", None) for r in replicas
        }
        self._turn = itertools.count()
        self._checker: asyncio.Task[None] | None = None

    async def open(self) -> None:
        for replica in self.replicas:
            await replica.open(wait=False)
        await self.check()
        self._checker = asyncio.create_task(self._check_forever())

    async def close(self, timeout: float | None = None) -> None:
        if self._checker is not None:
            self._checker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checker
            self._checker = None
        await asyncio.gather(*(r.close(timeout) for r in self.replicas))

    async def _check_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.check()

    async def check(self) -> None:
        """Refresh every replica's health now."""
        results = await asyncio.gather(*(self._check_one(r) for r in self.replicas))
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

    async def _check_one(self, replica: Database) -> ReplicaHealth:
        try:
            row = await replica.run(
                lambda c: c.fetchrow(REPLICA_HEALTH_SQL, timeout=self.interval),
                retry=False,
                timeout=self.interval,
            )
        except PglayerError:
            return ReplicaHealth(replica.name, False, "unreachable", None)
        assert row is not None
        if not row["standby"]:
            return ReplicaHealth(replica.name, False, "not a standby", None)
        lag = row["lag"]
        # NULL: behind, and nothing replayed since it started, so by how much is unknown.
        if lag is None or lag > self.max_lag:
            return ReplicaHealth(replica.name, False, "lagging", lag)
        return ReplicaHealth(replica.name, True, "ok", lag)

    def choose(self) -> Database | None:
        """A healthy replica (round-robin), or None when there is none."""
        healthy = [r for r in self.replicas if self.health[r.name].healthy]
        if not healthy:
            return None
        return healthy[next(self._turn) % len(healthy)]

    def mark_failed(self, replica: Database) -> None:
        """Take `replica` out of rotation until its next successful check."""
        if self.health[replica.name].healthy:
            log.warning("replica %s is out of rotation (a read failed on it)", replica.name)
        self.health[replica.name] = ReplicaHealth(replica.name, False, "unreachable", None)
