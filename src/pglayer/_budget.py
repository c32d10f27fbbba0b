"""The connection budget: do `workers * max_size` (+ a reserve) fit in the server's limit,
and in the role's and the database's `CONNECTION LIMIT`?"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["CLIENT", "ConnectionBudget", "read_budget"]

# A client connection. To a role without `pg_read_all_stats`, another role's sessions show
# no `backend_type` (their database, role and application name stay): counted by having a
# database, as a few background workers of a database are too (the safe side). Without it,
# a second app under its own role always fit.
CLIENT = "(backend_type = 'client backend' OR (backend_type IS NULL AND datname IS NOT NULL))"

# The asking connection is left out of both counts: `pglayer doctor`'s own probe is neither
# the app's nor another user's (the pool's own, at open, is one of ours either way).
_QUERY = f"""
SELECT current_setting('max_connections')::int AS max_connections,
       current_setting('superuser_reserved_connections')::int AS reserved,
       (SELECT count(*) FROM pg_stat_activity
         WHERE {CLIENT} AND pid <> pg_backend_pid())::int AS in_use,
       (SELECT count(*) FROM pg_stat_activity
         WHERE {CLIENT} AND pid <> pg_backend_pid()
           AND application_name = $1 AND datname = current_database())::int AS ours,
       r.rolsuper AS superuser,
       current_user AS role,
       r.rolconnlimit AS role_limit,
       (SELECT count(*) FROM pg_stat_activity
         WHERE {CLIENT} AND pid <> pg_backend_pid()
           AND usesysid = r.oid)::int AS role_in_use,
       (SELECT count(*) FROM pg_stat_activity
         WHERE {CLIENT} AND pid <> pg_backend_pid() AND usesysid = r.oid
           AND application_name = $1 AND datname = current_database())::int AS role_ours,
       d.datconnlimit AS database_limit,
       (SELECT count(*) FROM pg_stat_activity
         WHERE {CLIENT} AND pid <> pg_backend_pid()
           AND datname = current_database())::int AS database_in_use
  FROM pg_roles r, pg_database d
 WHERE r.rolname = current_user AND d.datname = current_database()
"""


@dataclass(frozen=True, slots=True)
class _Limit:
    """A `CONNECTION LIMIT` (of the role, or the database) and the connections under it."""

    name: str
    limit: int
    in_use: int
    ours: int

    @property
    def available(self) -> int:
        return self.limit - (self.in_use - self.ours)


@dataclass(frozen=True, slots=True)
class ConnectionBudget:
    workers: int
    max_size: int
    reserve: int
    max_connections: int
    superuser_reserved: int
    in_use: int  # client connections now, all applications (the asking one left out)
    ours: int  # of those, the ones with this application_name, in this database
    # The role's and the database's CONNECTION LIMIT, where one applies (superusers: none).
    limits: tuple[_Limit, ...] = ()
    superuser: str | None = None  # the role's name, when it is a superuser

    @property
    def used_by_others(self) -> int:
        return self.in_use - self.ours

    @property
    def needed(self) -> int:
        return self.pools + self.reserve

    @property
    def server_available(self) -> int:
        return self.max_connections - self.superuser_reserved - self.used_by_others

    @property
    def pools(self) -> int:
        """The connections the pools may hold: a role's or a database's limit is theirs
        alone (the reserve is the server's, for an admin of another role too)."""
        return self.workers * self.max_size

    @property
    def fits(self) -> bool:
        return self.needed <= self.server_available and all(
            self.pools <= limit.available for limit in self.limits
        )

    def exceeded(self, target: str, sizes: str, source: str) -> str:
        """What a pool opening past this budget says: `sizes` the pools counted, `source`
        where the worker count came from."""
        return (
            f"database {target}: connection budget exceeded: {self.describe()}"
            f" ({sizes}; workers: {source})"
        )

    def describe(self) -> str:
        said = (
            f"{self.workers} worker(s) x max_size {self.max_size} + reserve {self.reserve} = "
            f"{self.needed}; the server allows {self.max_connections} - "
            f"{self.superuser_reserved} reserved - {self.used_by_others} used by others = "
            f"{self.server_available}"
        )
        for limit in self.limits:
            if self.pools > limit.available:
                said += (
                    f"; the {limit.name}'s CONNECTION LIMIT {limit.limit} -"
                    f" {limit.in_use - limit.ours} used by others = {limit.available},"
                    f" for {self.pools}"
                )
        return said


async def read_budget(
    conn: Any, *, application_name: str, workers: int, max_size: int, reserve: int
) -> ConnectionBudget:
    """Read the server's limits over `conn` (an asyncpg or pglayer connection)."""
    row = await conn.fetchrow(_QUERY, application_name)
    limits = []
    if not row["superuser"]:  # PostgreSQL holds superusers to neither limit
        if row["role_limit"] >= 0:
            limits.append(_Limit("role", row["role_limit"], row["role_in_use"], row["role_ours"]))
        if row["database_limit"] >= 0:
            limits.append(
                _Limit("database", row["database_limit"], row["database_in_use"], row["ours"])
            )
    return ConnectionBudget(
        workers=workers,
        max_size=max_size,
        reserve=reserve,
        max_connections=row["max_connections"],
        superuser_reserved=row["reserved"],
        in_use=row["in_use"],
        ours=row["ours"],
        limits=tuple(limits),
        superuser=row["role"] if row["superuser"] else None,
    )
