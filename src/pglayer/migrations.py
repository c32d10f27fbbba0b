"""Plain-SQL migrations applied in one transaction under a transaction-scoped advisory lock.

Why not Alembic or yoyo: both need a second driver (SQLAlchemy, psycopg) beside asyncpg,
and both hold their lock across statements on a session. Here the lock is
`pg_advisory_xact_lock`, released by COMMIT, so several workers starting at once are safe
and it also works through PgBouncer in transaction mode.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import NoReturn

import asyncpg

from pglayer._connection import Connection
from pglayer._database import Database
from pglayer._errors import (
    DatabaseError,
    LockTimeoutError,
    PglayerError,
    ProgrammingError,
    QueryTimeoutError,
    StatementsLostError,
    TransactionAbortedError,
    TransientError,
    raise_translated,
    translate,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "Migration",
    "MigrationError",
    "install_pglayer_tables",
    "load_migrations",
    "migrate",
    "pending_migrations",
]

log = logging.getLogger("pglayer.migrations")

# Any fixed 64-bit key; it only has to differ from other users of advisory locks.
LOCK_KEY = 0x70676C61796572  # "pglayer"
DEFAULT_TIMEOUT = 3600.0  # seconds a run may take, waiting for another's included
_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
# `-- pglayer:replaces <sha256> [why]`: the whole line, its end included; and what a line
# that means to be one begins with.
_REPLACES = re.compile(r"^--[ \t]*pglayer:replaces[ \t]+([0-9a-fA-F]{64})\b[^\n]*(?:\n|\Z)", re.M)
_MEANT_AS_REPLACES = re.compile(r"\s*--\s*pglayer\s*:\s*replaces", re.IGNORECASE)
_LINES = re.compile(r"[^\n]*")


class MigrationError(PglayerError):
    """A migration file is malformed, or an applied one was changed afterwards."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: str
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        """The SHA-256 of its SQL, less its `-- pglayer:replaces` lines (see `replaces`)."""
        sql = self.sql
        for found in reversed(_directives(sql)):
            sql = sql[: found.start()] + sql[found.end() :]
        return hashlib.sha256(sql.encode()).hexdigest()

    @property
    def replaces(self) -> frozenset[str]:
        """Checksums of earlier texts of this file, taken as applied where one of them was:
        each on a line `-- pglayer:replaces <sha256>`. For a released file that had to
        change; the change must suit a database that ran the earlier text, with a later
        file bringing it to what this text makes, if they differ."""
        return frozenset(found.group(1).lower() for found in _directives(self.sql))


def _directives(sql: str) -> list[re.Match[str]]:
    """The `-- pglayer:replaces` lines of `sql`: outside strings, quoted names, /* */
    comments and dollar-quoted bodies, where the same text is the body's own."""
    outside = _outside_quotes(sql)
    return [] if outside is None else [m for m in _REPLACES.finditer(sql) if outside(m.start())]


def _refuse_malformed_replaces(name: str, sql: str) -> None:
    """A line that means to be a `-- pglayer:replaces` one must be one: taken for a plain
    comment, it would let the refusal it was written to lift stand, unexplained."""
    outside = _outside_quotes(sql)
    if outside is None:
        return
    for line in _LINES.finditer(sql):
        text = line.group()
        if (
            _MEANT_AS_REPLACES.match(text)
            and not _REPLACES.fullmatch(text + "\n")
            and outside(line.start())
        ):
            number = sql.count("\n", 0, line.start()) + 1
            raise MigrationError(
                f"migration {name}, line {number}: write it `-- pglayer:replaces <sha256>`"
                " (the whole 64-digit checksum, at the start of its line), optionally"
                " followed by why"
            )


def _outside_quotes(sql: str) -> Callable[[int], bool] | None:
    """Whether a position of `sql` is outside everything quoted in either reading of
    standard_conforming_strings (a file may set it); None for a file that never says
    `pglayer`, which then costs no lexing."""
    if "pglayer" not in sql.lower():
        return None
    readings = [_quoted_spans(sql, conforming) for conforming in (True, False)]
    return lambda position: not any(_inside(spans, position) for spans in readings)


def _quoted_spans(sql: str, conforming: bool) -> list[tuple[int, int]]:
    """(start, end) of each string, quoted name, /* */ comment and dollar-quoted body of
    `sql`, in order, read with standard_conforming_strings as `conforming` says."""
    tokens = _TOKENS[conforming]
    spans: list[tuple[int, int]] = []
    pos = 0
    while pos < len(sql):
        token = tokens.match(sql, pos)
        assert token is not None  # `other` matches any character
        kind, start, pos = token.lastgroup, token.start(), token.end()
        if kind == "block":
            pos = _block_end(sql, pos)
        elif kind == "dollar":
            end = sql.find(token.group(), pos)
            pos = len(sql) if end < 0 else end + len(token.group())
        elif not (kind == "skip" and sql[start] in "'\"Ee"):
            continue
        spans.append((start, pos))
    return spans


def _inside(spans: list[tuple[int, int]], position: int) -> bool:
    at = bisect.bisect_left(spans, position, key=lambda span: span[0]) - 1
    return at >= 0 and position < spans[at][1]


def _given_twice(directories: Sequence[Path]) -> tuple[Path, Path] | None:
    """The first directory given twice (under two paths, say: its files would run twice, one
    history each), as it was given both times; else None."""
    seen: dict[str, Path] = {}
    for directory in directories:
        real = os.path.realpath(directory)
        if real in seen:
            return seen[real], directory
        seen[real] = directory
    return None


def _qualified(directory: Path) -> str | None:
    """A directory's history where its name is another's: with its parent's name (the path
    made absolute, not resolved: a link keeps its own)."""
    absolute = Path(os.path.abspath(directory))
    return f"{absolute.parent.name}/{absolute.name}" if absolute.parent.name else None


def load_migrations(directory: Path | Traversable) -> list[Migration]:
    """Read `NNNN_name.sql` files from `directory`, in version order."""
    found: list[Migration] = []
    for entry in directory.iterdir():
        if not entry.name.lower().endswith(".sql"):
            continue
        match = _NAME.match(entry.name)
        if match is None:
            raise MigrationError(
                "migration file name must look like 0001_name.sql (four digits, then lowercase"
                f" letters, digits and _): {entry.name}"
            )
        if not entry.is_file():
            raise MigrationError(f"migration {entry.name} is not a regular file")
        try:
            sql = entry.read_text(encoding="utf-8-sig")  # an editor's BOM is not SQL
        except UnicodeDecodeError as exc:
            raise MigrationError(
                f"migration {entry.name} is not UTF-8 text (byte {exc.object[exc.start]:#04x}"
                f" at offset {exc.start}): save it as UTF-8"
            ) from None
        _refuse_malformed_replaces(entry.name, sql)
        found.append(Migration(match.group(1), entry.name, sql))
    found.sort(key=lambda m: m.version)
    for earlier, later in itertools.pairwise(found):
        if earlier.version == later.version:
            raise MigrationError(
                f"two migrations of version {later.version} in {directory}:"
                f" {earlier.name} and {later.name}"
            )
    return found


# The table exists with `history` in its primary key.
_HISTORY_KEYED = """
    SELECT 1 FROM pg_index i JOIN pg_attribute a
        ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
     WHERE i.indrelid = to_regclass('pglayer_migrations') AND i.indisprimary
       AND a.attname = 'history'
"""
_HISTORY_READY = f"SELECT EXISTS ({_HISTORY_KEYED})"
_HISTORY_TABLE = f"""
CREATE TABLE IF NOT EXISTS pglayer_migrations (
    history    text NOT NULL DEFAULT 'default',
    version    text NOT NULL,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (history, version)
);
-- Tables made before histories existed: their rows belong to the `default` history.
ALTER TABLE pglayer_migrations ADD COLUMN IF NOT EXISTS history text NOT NULL DEFAULT 'default';
DO $$
BEGIN
    IF NOT EXISTS ({_HISTORY_KEYED}) THEN
        ALTER TABLE pglayer_migrations DROP CONSTRAINT pglayer_migrations_pkey;
        ALTER TABLE pglayer_migrations ADD PRIMARY KEY (history, version);
    END IF;
END $$;
"""


async def migrate(
    db: Database,
    migrations: list[Migration],
    *,
    history: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    pglayer_tables: bool = False,
) -> list[str]:
    """Apply what is not applied yet; return the names applied. Safe to run concurrently.

    Each `history` (one per migration directory) is versioned apart, so two applications'
    `0001_...` files on one database never collide. Unnamed, it is "default", and a new one
    whose files are all applied under another history is refused (the same directory under
    another name); named, it is taken as given, unless it is that other name but for its
    case (a typo). `timeout` (seconds) bounds the whole run,
    waiting for another process's run included; the files' statements are bound by it,
    not by `PGLAYER_QUERY_TIMEOUT` or `statement_timeout`, and each lock they wait for (on a
    table an app is using) by `PGLAYER_LOCK_TIMEOUT`.

    `pglayer_tables`: pglayer's own tables first (`install_pglayer_tables`), in the same
    transaction, their names returned as `pglayer/NAME`: both histories are checked before
    either is applied, so a refused run changes nothing.
    """
    ours, runs = _histories(migrations, history, pglayer_tables)
    done = await _migrate(db, runs, timeout=timeout)
    return [name if h == ours.name else f"{h}/{name}" for h, name in done]


async def pending_migrations(
    db: Database,
    migrations: list[Migration],
    *,
    history: str | None = None,
    pglayer_tables: bool = False,
) -> list[str]:
    """The names of `migrations` not applied yet (pglayer's own as `pglayer/NAME`), checked
    as `migrate` checks them (a changed applied file is a `MigrationError`); nothing is
    applied. For an app that must not serve a schema older than its code."""
    ours, runs = _histories(migrations, history, pglayer_tables)
    missing: list[str] = []
    async with db.connection() as conn:
        # Without the table, or with one from before histories, `migrate` has work to do.
        ready = await conn.fetchval(_HISTORY_READY)
        claimed: set[str] = set()
        for run in runs:
            run, applied = await _check(conn, run, claimed) if ready else (run, {})
            prefix = "" if run is ours else f"{run.name}/"
            missing += [prefix + m.name for m in run.migrations if m.version not in applied]
    return missing


@dataclass(frozen=True, slots=True)
class _History:
    name: str
    migrations: list[Migration]
    named: bool  # given by the caller, not taken by default (a directory's name, "default")
    # A directory's history where its name is another directory's on the database (two
    # apps' `migrations/`): the name with its parent's ("billing/migrations").
    qualified: str | None = None


def _histories(
    migrations: list[Migration], history: str | None, pglayer_tables: bool
) -> tuple[_History, list[_History]]:
    """The caller's history, and the run's: pglayer's own first where asked."""
    ours = _History(history or "default", migrations, named=history is not None)
    pglayers = [_pglayer_history()] if pglayer_tables else []
    return ours, [*pglayers, ours]


async def _migrate(
    db: Database, runs: list[_History], *, timeout: float = DEFAULT_TIMEOUT
) -> list[tuple[str, str]]:
    """Apply `runs` in one transaction, each history checked before any is applied; return
    the (history, name) of each file applied."""
    for run in runs:
        if not run.name or run.name != run.name.strip():
            raise MigrationError(f"history name {run.name!r} is empty or has spaces around it")
        if not isinstance(run.migrations, list):
            raise TypeError(
                f"migrations must be a list of Migration, as load_migrations(Path(...))"
                f" returns, not {type(run.migrations).__name__}"
            )
    if not timeout > 0:  # NaN bounded nothing
        raise ValueError(f"timeout must be a number of seconds above 0, not {timeout!r}")
    deadline = time.monotonic() + timeout
    try:
        return await _migrate_once(db, runs, deadline, timeout)
    except StatementsLostError:
        # A pooler lost the driver's statements (its mode changed, or it was said to be a
        # session pooler): the pool names none from now on, and the run, which aborted
        # with nothing applied, can run again.
        return await _migrate_once(db, runs, deadline, timeout)


async def _migrate_once(
    db: Database, runs: list[_History], deadline: float, timeout: float
) -> list[tuple[str, str]]:
    async with db.transaction(timeout=60) as conn:
        try:
            if await conn.fetchval("SELECT pg_is_in_recovery()"):
                raise MigrationError(
                    "this server is a read-only standby: run migrations against the primary"
                )
            # The run's deadline bounds it, not the pool's idle-in-transaction bound: between
            # statements the run checks its files, which for a large one takes seconds.
            left = min(deadline - time.monotonic(), 2_000_000.0)  # under PostgreSQL's 2^31 ms
            idle_ms = max(1, math.ceil(left * 1000))
            await conn.execute(
                "SET LOCAL lock_timeout = 0; SET LOCAL statement_timeout = 0;"
                f" SET LOCAL idle_in_transaction_session_timeout = {idle_ms}"
            )
            try:
                await _script(conn, f"SELECT pg_advisory_xact_lock({LOCK_KEY})", deadline)
            except QueryTimeoutError:
                raise MigrationError(
                    f"waited {timeout:.3g} s for another process's migrations to finish (the"
                    " migration lock); nothing was applied"
                ) from None
            lock_ms = round(db.settings.lock_timeout * 1000)
            await conn.execute(f"SET LOCAL lock_timeout = {lock_ms}")
            # Made (or brought up to date) only when it must be: an app's role may lack the
            # privilege to create tables once its schema is in place.
            if not await conn.fetchval(_HISTORY_READY):
                await conn.execute(_HISTORY_TABLE)
            return await _apply_all(conn, runs, _Run(deadline, timeout, lock_ms))
        except (ProgrammingError, TransactionAbortedError) as exc:  # 42501: no privilege
            # A migration's own failure is a MigrationError naming it: this is the history's.
            raise MigrationError(
                f"cannot keep the migration history: {_server_reason(exc)}"
            ) from exc


def _server_reason(exc: DatabaseError) -> str:
    # The operator needs the server's own words here (a migration may explain itself with
    # RAISE); pglayer's errors carry only their class's message.
    cause = exc.__cause__
    if not isinstance(cause, asyncpg.PostgresError):
        return str(exc)
    hint = getattr(cause, "hint", None)
    said = f"{_cut(str(cause.args[0])) if cause.args else exc} ({exc.sqlstate})"
    return said + (f" {_cut(str(hint))}" if hint else "")


_MAX_REASON = 500  # characters of the server's words kept: it quotes the token at fault whole


def _cut(text: str) -> str:
    """`text`, or its start and its length where it is long (a 40 MB literal not closed
    was one line of 40 MB, in the log and on the terminal)."""
    if len(text) <= _MAX_REASON:
        return text
    return f"{text[:_MAX_REASON]}... ({len(text):,} characters)"


def _position(sql: str, exc: DatabaseError) -> str:
    """` at line L, column C` of the file, where the server says the error is (if it does)."""
    position = getattr(exc.__cause__, "position", None)
    if not (isinstance(position, str) and position.isdigit()) or int(position) > len(sql):
        return ""
    before = sql[: int(position) - 1]  # the server counts characters from 1
    line = before.count("\n") + 1
    column = len(before) - (before.rfind("\n") + 1) + 1
    return f" at line {line}, column {column}"


@dataclass(frozen=True, slots=True)
class _Run:
    deadline: float  # time.monotonic()
    timeout: float
    lock_ms: int


async def _script(conn: Connection, sql: str, deadline: float) -> None:
    """Run `sql` (statements of a file, or a lock's wait) by the run's deadline.

    On the driver's connection: not timed as the app's queries are, nor logged as a slow
    query with its text, which may hold a secret (`CREATE ROLE ... PASSWORD`)."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise QueryTimeoutError()
    try:
        await conn.raw.execute(sql, timeout=left)
    except Exception as exc:
        raise_translated(exc, translate(exc))


async def _apply_all(conn: Connection, runs: list[_History], limits: _Run) -> list[tuple[str, str]]:
    """Check every history against its directory, then apply each in turn."""
    claimed: set[str] = set()
    checked = [await _check(conn, run, claimed) for run in runs]
    done: list[tuple[str, str]] = []
    for run, applied in checked:
        await _apply(conn, run, applied, limits, done)
    return done


async def _check(
    conn: Connection, run: _History, claimed: set[str]
) -> tuple[_History, dict[str, asyncpg.Record]]:
    """`run` (under its qualified name, where its own is another directory's) and its
    applied files, once its directory is known to fit them; else refused. `claimed`: the
    histories of the runs checked before it in this run, to which its own is added."""
    applied = await _applied(conn, run.name)
    if run.qualified is not None:
        qualified = await _applied(conn, run.qualified)
        taken = run.name in claimed  # by a directory of the same name, earlier in this run
        if qualified or taken or (applied and not _in_common(run.migrations, applied)):
            if not qualified:  # said once, as it is decided
                log.warning(
                    "history %r on this database is another directory's (%s): this one's is %r",
                    run.name,
                    "another of that name in this run"
                    if taken
                    else "it holds none of this one's files, by name or by text",
                    run.qualified,
                )
            run, applied = replace(run, name=run.qualified, qualified=None), qualified
    if run.name in claimed:
        raise MigrationError(
            f"two directories of this run would share history {run.name!r}: name each one's"
            " (`--history NAME`, or `history=`); nothing was applied"
        )
    claimed.add(run.name)
    migrations, history = run.migrations, run.name
    if not applied and migrations:
        await _refuse_applied_elsewhere(conn, migrations, history, run.named)
    _check_order(migrations, applied, history)
    for m in migrations:
        previous = applied.get(m.version)
        if previous is None:
            _refuse_transaction_control(m)
        elif previous["checksum"] != m.checksum and previous["checksum"] not in m.replaces:
            _refuse_changed(m, previous, history)
    return run, applied


async def _applied(conn: Connection, history: str) -> dict[str, asyncpg.Record]:
    """The files applied under `history`, by version."""
    rows = await conn.fetch(
        "SELECT version, name, checksum FROM pglayer_migrations WHERE history = $1", history
    )
    return {r["version"]: r for r in rows}


def _in_common(migrations: list[Migration], applied: dict[str, asyncpg.Record]) -> bool:
    """Whether any applied file is one of `migrations`, by its name or its text (or one it
    replaces): a history without one is another directory's. One with a name in common is
    this one's, its files changed since (reformatted, a header added), and refused as such:
    taken for another's, its files would run again."""
    texts = {m.version: {m.checksum, *m.replaces} for m in migrations}
    names = {m.name for m in migrations}
    return any(
        r["name"] in names or r["checksum"] in texts.get(version, ())
        for version, r in applied.items()
    )


def _refuse_changed(m: Migration, previous: asyncpg.Record, history: str) -> NoReturn:
    # The whole applied checksum: a `-- pglayer:replaces` line needs it.
    if previous["name"] != m.name:
        raise MigrationError(
            f"migration {m.name}: version {m.version} of history {history!r} was"
            f" applied as {previous['name']} (sha256 {previous['checksum']}): this file"
            " replaced that one (name its applied text with `-- pglayer:replaces`), or"
            " another directory shares this history on this database, which then needs one"
            f" of its own (`--history NAME`, or `history=`: {_ALL_AGAIN}); nothing was applied"
        )
    raise MigrationError(
        f"migration {m.name} was changed after it was applied (applied: sha256"
        f" {previous['checksum']}, now {m.checksum}); add a new migration instead (or, if"
        " the change suits a database that ran the applied text, name it in the file:"
        f" `-- pglayer:replaces {previous['checksum']}`; or, if another directory named"
        f" {history!r} shares this history on this database, give it its own: `--history"
        f" NAME`, or `history=`: {_ALL_AGAIN}); nothing was applied"
    )


# Said wherever a new history is advised: following that advice for a directory whose files
# were applied under the old one applies them a second time.
_ALL_AGAIN = "a new history runs every file again, so only for files never applied here"


async def _apply(
    conn: Connection,
    run: _History,
    applied: dict[str, asyncpg.Record],
    limits: _Run,
    done: list[tuple[str, str]],
) -> None:
    """Apply `run`'s files not in `applied`, each added to `done` (the run's so far)."""
    for m in run.migrations:
        if m.version in applied:
            if applied[m.version]["name"] != m.name:
                # Renamed since: recorded, so that a later edit is still told from another
                # app's file (nothing in common by name or text: see `_in_common`).
                await conn.execute(
                    "UPDATE pglayer_migrations SET name = $3 WHERE history = $1 AND version = $2",
                    run.name,
                    m.version,
                    m.name,
                )
            continue  # applied (under this name, or one since renamed, or an earlier text)
        log.info("applying migration %s/%s", run.name, m.name)
        try:
            # asyncpg fails on a query with no statement (an AttributeError of its own).
            if next(_first_words(m.sql, True), None) is not None:  # the lexer: no regex blow-up
                await _script(conn, m.sql, limits.deadline)
        except DatabaseError as exc:
            raise _failed(m, exc, limits, done) from exc
        if not conn.raw.is_in_transaction():  # what the check before running missed
            raise MigrationError(
                f"migration {m.name} ended the run's transaction: {_ONE_TRANSACTION}"
            )
        await conn.execute(
            "INSERT INTO pglayer_migrations (history, version, name, checksum)"
            " VALUES ($1, $2, $3, $4)",
            run.name,
            m.version,
            m.name,
            m.checksum,
        )
        done.append((run.name, m.name))


def _failed(m: Migration, exc: DatabaseError, run: _Run, done: list[tuple[str, str]]) -> Exception:
    """The error to raise for `m`'s failure `exc`, saying what it means for the run."""
    if isinstance(exc, QueryTimeoutError):
        reason = f"did not finish within {run.timeout:.3g} s (the run's timeout)"
    elif isinstance(exc, LockTimeoutError):
        reason = (
            f"waited longer than PGLAYER_LOCK_TIMEOUT ({run.lock_ms / 1000:g} s) for a lock"
            " another session holds on what it changes; retry when that work is done"
        )
    elif isinstance(exc, TransientError):
        return exc  # lost, or refused: nothing of the run was committed; said by the caller
    else:
        reason = f"failed{_position(m.sql, exc)}: {_server_reason(exc)}"
    names = ", ".join(f"{history}/{name}" for history, name in done)
    earlier = f" (nor {names}, before it in this run)" if done else ""
    return MigrationError(f"migration {m.name} {reason}; nothing was applied{earlier}")


# One run is one transaction: a COMMIT in a file would apply the files before it, and a
# ROLLBACK undo them while the rest of the run goes on, each statement committed alone.
_ONE_TRANSACTION = (
    "a run applies its files in one transaction, so BEGIN, COMMIT, ROLLBACK and END do not"
    " belong in them (nor what cannot run in a transaction, as CREATE INDEX CONCURRENTLY)"
)
# PostgreSQL's identifiers take any non-ASCII character as a letter (`é$$` is one word).
_LETTER = "A-Za-z_\u0080-\U0010ffff"
# Each written as runs of plain characters between the escapes (not one alternation per
# character), possessive (nothing to backtrack into: PostgreSQL's lexer does not either),
# so that a long literal, or one of many escaped quotes, costs the engine no memory.
_PLAIN = r"'[^']*+(?:''[^']*+)*+'"
_ESCAPED = r"'[^'\\]*+(?:(?:\\.|'')[^'\\]*+)*+'"
_QUOTED = r'"[^"]*+(?:""[^"]*+)*+"'
_STRINGS = {
    # With standard_conforming_strings on (the default) a backslash is a plain character in
    # '...', with it off (a file may set that) it escapes: a file is read both ways.
    True: rf"[Ee]{_ESCAPED}|{_PLAIN}",
    False: rf"[Ee]?{_ESCAPED}",
}
_TOKENS = {
    conforming: re.compile(
        rf"""(?P<skip>\s+|--[^\n]*|{strings}|{_QUOTED})
          | (?P<block>/\*)
          | (?P<dollar>\$(?:[{_LETTER}][{_LETTER}0-9]*)?\$)
          | (?P<word>[{_LETTER}][{_LETTER}0-9$]*)
          | (?P<semi>;)
          | (?P<other>.)""",
        re.VERBOSE | re.DOTALL,
    )
    for conforming, strings in _STRINGS.items()
}


def _first_words(sql: str, conforming: bool) -> Iterator[list[str]]:
    """The first two words of each statement of `sql` (upper case), outside strings, quoted
    names, comments and dollar-quoted bodies; the `BEGIN ATOMIC` body of a `CREATE` is part
    of its statement."""
    tokens = _TOKENS[conforming]
    words: list[str] = []
    previous = ""  # the token before, if a word
    atomic = body_statement_starts = False
    pos = 0
    while pos < len(sql):
        token = tokens.match(sql, pos)
        assert token is not None  # `other` matches any character
        kind, pos = token.lastgroup, token.end()
        if kind == "skip":
            continue
        if kind == "block":
            pos = _block_end(sql, pos)
            continue
        if kind == "dollar":
            end = sql.find(token.group(), pos)
            pos = len(sql) if end < 0 else end + len(token.group())
        elif kind == "word":
            word = token.group().upper()
            if atomic and body_statement_starts and word == "END":
                atomic = False
            elif (previous, word) == ("BEGIN", "ATOMIC") and words[:1] == ["CREATE"]:
                atomic = True  # a body of statements, up to an END where one would start
            body_statement_starts = atomic and word == "ATOMIC"
            if len(words) < 2:
                words.append(word)
            previous = word
            continue
        elif kind == "semi":
            if atomic:
                body_statement_starts = True
            elif words:
                yield words
                words = []
        previous = ""
    if words:
        yield words


def _block_end(sql: str, pos: int) -> int:
    """Where a /* comment */ that began before `pos` ends (they nest)."""
    depth = 1
    while depth and pos < len(sql):
        if sql.startswith("/*", pos):
            depth, pos = depth + 1, pos + 2
        elif sql.startswith("*/", pos):
            depth, pos = depth - 1, pos + 2
        else:
            pos += 1
    return pos


def _ends_transaction(words: list[str]) -> bool:
    first, second = words[0], (words[1:] or [""])[0]
    if first in ("BEGIN", "COMMIT", "END", "ABORT"):
        return True
    if first == "ROLLBACK":
        return second != "TO"  # ROLLBACK TO SAVEPOINT stays inside
    return second == "TRANSACTION" and first in ("START", "PREPARE")


def _refuse_transaction_control(m: Migration) -> None:
    for words in (*_first_words(m.sql, True), *_first_words(m.sql, False)):
        if _ends_transaction(words):
            raise MigrationError(f"migration {m.name} has {' '.join(words)}: {_ONE_TRANSACTION}")


async def _refuse_applied_elsewhere(
    conn: Connection, migrations: list[Migration], history: str, named: bool
) -> None:
    """Refuse a new history when another holds only files of this directory (unchanged, or
    earlier texts they replace): the same directory under another name (the CLI names a
    history after its directory, `migrate()` defaults to "default"), which would apply every
    file again. Another app's history that merely shares a first file has files of its own.
    A name given by the caller is taken as given, unless it is that other name but for its
    case (a typo)."""
    # As `_check` takes them: the same SQL (under any name: renamed) or an earlier text it
    # replaces. A file changed without a `replaces` line is another app's, for all one knows.
    texts = {m.version: {m.checksum, *m.replaces} for m in migrations}
    others: dict[str, bool] = {}
    for row in await conn.fetch(
        "SELECT history, version, name, checksum FROM pglayer_migrations WHERE history <> $1",
        history,
    ):
        mine = row["checksum"] in texts.get(row["version"], ())
        others[row["history"]] = others.get(row["history"], True) and mine
    same = sorted(name for name, within in others.items() if within)
    if named:
        same = [name for name in same if name.casefold() == history.casefold()]
    if same:
        raise MigrationError(
            f"history {history!r} has nothing applied on this database, but history"
            f" {same[0]!r} holds these same files: they were applied under that"
            f" name (pass `--history {same[0]}`, or `history={same[0]!r}`; or, for another"
            " app's files, name this history yourself); nothing was applied"
        )


def _check_order(
    migrations: list[Migration], applied: dict[str, asyncpg.Record], history: str
) -> None:
    """Refuse a history with gaps against the directory: applied versions the directory lacks
    (below its latest: later ones are a newer release's, as after a rollback), or versions
    to apply below the latest applied (both are what another directory's history looks like)."""
    local = {m.version for m in migrations}
    latest_local = max(local, default="")
    latest_applied = max(applied, default="")
    missing = sorted(v for v in applied if v not in local and v < latest_local)
    late = sorted(v for v in local if v not in applied and v < latest_applied)
    if not (missing or late):
        return
    found = (
        f"applied {', '.join(applied[v]['name'] for v in missing)}, not in this directory"
        if missing
        else f"has {latest_applied} applied before {', '.join(late)} of this directory"
    )
    raise MigrationError(
        f"history {history!r} on this database {found}: another directory shares this"
        " history (a history is named after its directory; give this one its own:"
        " `--history NAME`, or `history=`), or files were removed or added out of order"
    )


async def install_pglayer_tables(db: Database, *, timeout: float = DEFAULT_TIMEOUT) -> list[str]:
    """Create pglayer's own tables (idempotency keys), in the `pglayer` history; idempotent.
    With an app's own migrations, `migrate(..., pglayer_tables=True)` applies both at once."""
    runs = [_pglayer_history()]
    return [name for _, name in await _migrate(db, runs, timeout=timeout)]


def _pglayer_history() -> _History:
    """pglayer's own tables, in their history."""
    return _History("pglayer", load_migrations(files("pglayer") / "_sql"), named=True)
