"""`diagnose()`: what will happen when this configuration meets this server, in plain words.

Every check is a `Finding` (ok / warn / fail). A `fail` means something will break in
production, and `pglayer doctor` exits non-zero for it.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import asyncpg

from pglayer._budget import CLIENT, read_budget
from pglayer._dsn import describe_target
from pglayer._errors import explain_connect_error
from pglayer._pooler import (
    bounded_transaction,
    connect_plain,
    dsn_ports,
    pool_mode,
    pooled,
    prepared_statements_safe,
    server_timeouts,
    settings_off,
)
from pglayer._replicas import REPLICA_HEALTH_SQL
from pglayer._settings import DatabaseSettings, misspelt_settings

__all__ = ["Diagnosis", "Finding", "diagnose", "explain_connect_error"]

Level = Literal["ok", "warn", "fail"]


@dataclass(frozen=True, slots=True)
class Finding:
    check: str
    level: Level
    detail: str


@dataclass(slots=True)
class Diagnosis:
    target: str
    findings: list[Finding] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    def add(self, check: str, level: Level, detail: str) -> None:
        self.findings.append(Finding(check, level, detail))

    @property
    def failed(self) -> bool:
        return any(f.level == "fail" for f in self.findings)


_GROUPS = f"""
SELECT coalesce(datname, '') AS database, application_name, count(*)::int AS connections
  FROM pg_stat_activity WHERE {CLIENT} AND pid <> pg_backend_pid()
 GROUP BY 1, 2 ORDER BY 3 DESC, 1, 2 LIMIT 8
"""


_SERVER_FACTS = """
SELECT current_setting('server_version') AS version,
       inet_server_port() AS server_port,
       pg_backend_pid() AS backend_pid,
       pg_is_in_recovery() AS in_recovery,
       current_user AS role,
       current_database() AS database,
       CASE WHEN NOT pg_is_in_recovery() THEN pg_current_wal_lsn()::text END AS lsn,
       (SELECT system_identifier FROM pg_control_system()) AS cluster
"""


_PROBE_FAILURES = (TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError)


def _why(exc: BaseException, target: str) -> str:
    """A probe's failure: a statement timeout set too short to run a catalogue read is
    named as such (the role's or database's `statement_timeout`, which doctor reports)."""
    if isinstance(exc, asyncpg.QueryCanceledError):
        return (
            "a statement was cancelled (57014): the role's or database's statement_timeout is"
            " too short for any work (`ALTER ROLE ... RESET statement_timeout`)"
        )
    return explain_connect_error(exc, target)


async def diagnose(
    settings: DatabaseSettings, *, workers: int | None = None, reserve: int = 5
) -> Diagnosis:
    """Check `settings` against the server it points at (`workers`: else as the app would)."""
    workers, source = (workers, "given") if workers is not None else settings.worker_count()
    dsn = settings.dsn()
    target = describe_target(dsn)
    result = Diagnosis(target)
    try:
        conn = await connect_plain(dsn, settings)
    except Exception as exc:
        result.add("reachable", "fail", explain_connect_error(exc, target))
        return result
    try:
        # A pooler accepts the connection itself and holds the query while its server is
        # down (PgBouncer: `query_wait_timeout`, 120 s): bounded as a connect is.
        row, login_pid, timeouts, budget, groups = await _read_server(
            conn, settings, workers, reserve
        )
    except _PROBE_FAILURES as exc:
        reason = _why(exc, target)
        result.add(
            "reachable",
            "fail",
            f"{reason}, after it accepted the connection (a pooler whose server is down"
            " or full answers so)",
        )
        return result
    finally:
        await conn.close(timeout=settings.connect_timeout)
    assert row is not None
    position = _Position(row["lsn"], row["cluster"])
    result.facts.update(
        {k: v for k, v in row.items() if k not in ("lsn", "cluster", "backend_pid")}
    )
    result.add("reachable", "ok", f"connected to {target}")
    major = int(str(row["version"]).split(".")[0])
    result.add(
        "server version",
        "ok" if major >= 14 else "warn",
        f"PostgreSQL {row['version']}"
        + ("" if major >= 14 else " (client_connection_check_interval needs 14+)"),
    )
    if row["in_recovery"]:
        result.add("primary", "fail", "this server is a read-only standby, not a primary")

    port = ", ".join(map(str, dsn_ports(dsn)))
    behind = pooled(dsn, row["server_port"], row["backend_pid"], login_pid)
    result.facts["pooler"] = None
    if behind:
        try:
            mode = await pool_mode(dsn, settings)
        except _PROBE_FAILURES as exc:
            result.add("pooler", "fail", f"probing the pooler failed: {_why(exc, target)}")
            return result
        result.facts["pooler"] = mode
        result.add(
            "pooler",
            "ok" if mode != "statement" else "fail",
            f"a connection pooler sits between (client port {port}, server port "
            f"{row['server_port']}, backend {row['backend_pid']} of login {login_pid}),"
            f" in {mode} mode" + (": transactions cannot work" if mode == "statement" else ""),
        )
        if mode in ("transaction", "session"):  # either drops what is sent at connect
            _check_role_timeouts(settings, row, timeouts, result)
        if mode == "transaction":
            try:
                safe = await prepared_statements_safe(dsn, settings)
            except _PROBE_FAILURES as exc:
                result.add("prepared statements", "fail", f"the probe failed: {_why(exc, target)}")
                return result
            result.facts["prepared_statements"] = safe
            if safe:
                result.add(
                    "prepared statements",
                    "ok",
                    "they survive the pooler (PgBouncer ≥ 1.21 with max_prepared_statements)",
                )
            elif settings.statement_cache_size and settings.pooler in ("none", "pgbouncer-session"):
                # Told there is no transaction pooler, the pool keeps asyncpg's statement cache.
                result.add(
                    "prepared statements",
                    "fail",
                    f"the pooler loses prepared statements, but PGLAYER_POOLER={settings.pooler}"
                    " keeps them on: set PGLAYER_POOLER=auto or pgbouncer-transaction",
                )
            elif settings.statement_cache_size:
                result.add(
                    "prepared statements",
                    "ok",
                    "the pooler loses them: the pool turns asyncpg's statement cache off"
                    f" (PGLAYER_POOLER={settings.pooler})",
                )
            else:
                result.add(
                    "prepared statements",
                    "ok",
                    "not used (statement_cache_size=0), as this pooler requires",
                )
    else:
        result.add("pooler", "ok", "none: connected straight to PostgreSQL")

    result.facts["budget"] = {**asdict(budget), "used_by_others": budget.used_by_others}
    described = f"{budget.describe()}; workers: {source}"
    if behind:
        result.add("connection budget", "ok", f"{described} (the pooler's own limits apply)")
        if result.facts["pooler"] == "session":
            result.add(
                "pooler pool size",
                "ok",
                "session mode pins one server connection per client connection: the pooler's"
                f" pool for this database and user must hold {budget.pools}"
                " (workers x max_size), or clients wait in its queue",
            )
    else:
        result.add("connection budget", "ok" if budget.fits else "fail", described)
    if budget.superuser is not None:
        result.add(
            "role",
            "warn",
            f"the app connects as {budget.superuser!r}, a superuser: no CONNECTION LIMIT of"
            " the role or the database holds it, its connections may take the slots kept"
            " for administrators (superuser_reserved_connections), and it may do anything"
            " to any database; give the app a role of its own",
        )
    await _check_replicas(settings, result, position)
    for message in misspelt_settings():
        result.add("settings", "warn", message)
    result.facts["connections"] = [dict(row) for row in groups]
    listed = ", ".join(
        f"{row['connections']} by {row['application_name']!r} in {row['database']!r}"
        for row in groups
    )
    others = [  # in this database: an app on pglayer in another is another app
        name
        for name, database in ((str(g["application_name"]), g["database"]) for g in groups)
        if name.startswith("pglayer:")
        and not name.endswith("-doctor")  # not a probe
        and database == row["database"]
    ]
    hint = (
        " (an app on pglayer is connected under another name: run `pglayer doctor APP` from"
        " its directory, as it is served, or set PGLAYER_APPLICATION_NAME as it has it)"
        if not budget.ours and others
        else ""
    )
    result.add(
        "in use now",
        "ok",
        f"{budget.ours} connection(s) are this app's ({settings.application_name!r} in this"
        f" database), {budget.in_use} client connection(s) in all besides this check's:"
        f" {listed or 'none'}{hint}",
    )
    if not behind and budget.ours > workers * settings.max_size:
        result.add(
            "workers",
            "warn",
            f"this app holds {budget.ours} connections, more than {workers} worker(s) x"
            f" max_size {settings.max_size} can: it runs with more workers than assumed"
            f" ({source}), and the budget above counts too few; set PGLAYER_WORKERS, or pass"
            " --workers",
        )
    return result


async def _read_server(
    conn: Any, settings: DatabaseSettings, workers: int, reserve: int
) -> tuple[Any, int, dict[str, int], Any, list[Any]]:
    """What the checks need, read in one transaction bounded by its own timeouts (see
    `bounded_transaction`): a role's tiny ones, which doctor reports, must not end its reads."""
    async with bounded_transaction(conn, settings, readonly=True):
        row = await conn.fetchrow(_SERVER_FACTS, timeout=settings.connect_timeout)
        timeouts = await server_timeouts(conn)
        budget = await read_budget(
            conn,
            application_name=settings.application_name,
            workers=workers,
            max_size=settings.max_size,
            reserve=reserve,
        )
        groups = await conn.fetch(_GROUPS)
    return row, conn.get_server_pid(), timeouts, budget, groups


def _check_role_timeouts(
    settings: DatabaseSettings,
    row: Mapping[str, Any],
    server_ms: dict[str, int],
    result: Diagnosis,
) -> None:
    """Behind a pooler no timeout is sent at connect: the server's own apply."""
    result.facts["server_timeouts_ms"] = server_ms
    off = settings_off(settings, server_ms)
    if not off:
        result.add("timeouts", "ok", "the role's server-side timeouts are the configured ones")
        return
    role = str(row["role"]).replace('"', '""')
    database = str(row["database"]).replace('"', '""')
    fixes = "; ".join(  # for this database only: the role may serve others
        f'ALTER ROLE "{role}" IN DATABASE "{database}" SET {name} = {value}'
        for name, (_, value) in off.items()
    )
    result.add(
        "timeouts",
        "warn",
        "a transaction pooler drops what pglayer sends at connect, so the server's own apply:"
        + "".join(f" {said};" for said, _ in off.values())
        + f" set them on the role: {fixes}; then reconnect the pooler's server connections"
        " (PgBouncer: RECONNECT on its console, or wait for server_lifetime)",
    )


@dataclass(frozen=True)
class _Position:
    lsn: str | None  # the primary's WAL position when doctor connected (None: a standby)
    cluster: int


async def _check_replicas(
    settings: DatabaseSettings, result: Diagnosis, primary: _Position
) -> None:
    """Each replica: reachable, a standby of this primary, and how far behind (reads skip it
    past the bound)."""
    for i, url in enumerate(settings.replica_urls, start=1):
        name = f"replica-{i}"
        dsn = url.get_secret_value()
        target = describe_target(dsn)
        try:
            conn = await connect_plain(dsn, settings)
        except Exception as exc:
            result.add(name, "warn", explain_connect_error(exc, target) + "; reads use the primary")
            continue
        try:
            row = await conn.fetchrow(REPLICA_HEALTH_SQL)
            assert row is not None
            lag = row["lag"]
            same = row["cluster"] == primary.cluster
            if row["standby"] and same and primary.lsn is not None:
                lag = await _catch_up(conn, primary.lsn, settings.replica_max_lag)
        finally:
            await conn.close()
        bound = settings.replica_max_lag
        if not row["standby"] and same and primary.lsn is not None:
            result.add(
                name,
                "fail",
                f"{target} takes writes, and so does the primary, both of one cluster: a"
                " failover left the old primary running? A new connection may write to either",
            )
        elif not row["standby"]:
            result.add(name, "warn", f"{target} is not a standby; it will not serve reads")
        elif not same:
            result.add(
                name, "warn", f"{target} is a standby of another server; it will not serve reads"
            )
        elif lag is None or lag > bound:
            said = "unknown" if lag is None else f"{lag:.1f}s"
            if lag == math.inf:
                said = f"more than {bound:g}s (has it stopped receiving from the primary?)"
            result.add(
                name,
                "warn",
                f"{target} is behind by {said} (bound {bound:g}s): "
                "reads go to the primary until it catches up",
            )
        else:
            result.add(name, "ok", f"{target} is a standby {lag:.1f}s behind the primary")


async def _catch_up(conn: asyncpg.Connection[Any], lsn: str, bound: float) -> float:
    """Seconds the replica took to replay what the primary had written at `lsn` (inf:
    not within `bound`)."""
    started = time.monotonic()
    while True:
        caught_up = await conn.fetchval("SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn", lsn)
        waited = time.monotonic() - started
        if caught_up:
            return waited
        if waited > bound:
            return math.inf
        await asyncio.sleep(0.1)
