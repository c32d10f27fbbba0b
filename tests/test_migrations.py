"""Migrations: applied once under an advisory lock, even from many runners at once."""

from __future__ import annotations

import asyncio
import hashlib
import tracemalloc
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
from pglayer_shop.schema import apply_migrations, shop_migrations

import pglayer
from pglayer import ConfigurationError, Database, DatabaseSettings
from pglayer._serve import apply_directories
from pglayer.migrations import MigrationError, load_migrations, migrate, pending_migrations
from tests.conftest import settings_for


async def test_concurrent_runners_apply_each_migration_exactly_once(empty_db_url: str) -> None:
    async def run() -> list[str]:
        async with Database(settings_for(empty_db_url, max_size=1)) as db:
            return await apply_migrations(db)

    ran = await asyncio.gather(*(run() for _ in range(6)))
    results = [[n for n in r if not n.startswith("pglayer/")] for r in ran]
    expected = [m.name for m in shop_migrations()]
    assert sorted(results, key=len, reverse=True)[0] == expected
    assert sum(len(r) for r in results) == len(expected)
    async with Database(settings_for(empty_db_url)) as db, db.connection() as conn:
        shop = "SELECT count(*) FROM pglayer_migrations WHERE history = 'default'"
        assert await conn.fetchval(shop) == len(expected)


async def test_a_changed_applied_migration_is_refused(empty_db_url: str, tmp_path: Path) -> None:
    (tmp_path / "0001_first.sql").write_text("CREATE TABLE t (id int);")
    async with Database(settings_for(empty_db_url)) as db:
        assert await migrate(db, load_migrations(tmp_path)) == ["0001_first.sql"]
        (tmp_path / "0001_first.sql").write_text("CREATE TABLE t (id bigint);")
        with pytest.raises(MigrationError, match="changed after it was applied"):
            await migrate(db, load_migrations(tmp_path))


async def test_a_changed_file_that_lists_the_applied_texts_checksum_is_taken_as_applied(
    empty_db_url: str, tmp_path: Path
) -> None:
    first = "CREATE TABLE t (id int);\n"
    (tmp_path / "0001_first.sql").write_text(first)
    async with Database(settings_for(empty_db_url)) as db:
        assert await migrate(db, load_migrations(tmp_path)) == ["0001_first.sql"]
        applied = hashlib.sha256(first.encode()).hexdigest()
        (tmp_path / "0001_first.sql").write_text(
            f"-- pglayer:replaces {applied}\nCREATE TABLE t (id bigint);\n"
        )
        assert await migrate(db, load_migrations(tmp_path)) == []
        (tmp_path / "0001_first.sql").write_text(
            f"-- pglayer:replaces {'0' * 64}\nCREATE TABLE t (id bigint);\n"
        )
        with pytest.raises(MigrationError, match="changed after it was applied") as refused:
            await migrate(db, load_migrations(tmp_path))
    assert f"`-- pglayer:replaces {applied}`" in str(refused.value)


@pytest.mark.parametrize(
    "line",
    [
        f"  -- pglayer:replaces {'a' * 64}",
        f"-- pglayer:replaces sha256:{'a' * 64}",
        f"-- pglayer:replaces {'a' * 12}",
        f"-- PGLAYER:REPLACES {'a' * 64}",
    ],
)
def test_a_replaces_line_not_written_as_one_is_refused_not_ignored(
    tmp_path: Path, line: str
) -> None:
    # Taken for a plain comment, the refusal it was written to lift stood, unexplained.
    (tmp_path / "0001_first.sql").write_text(f"{line}\nCREATE TABLE t (id int);\n")
    with pytest.raises(MigrationError, match="line 1: write it `-- pglayer:replaces <sha256>`"):
        load_migrations(tmp_path)


def test_a_replaces_line_inside_a_body_or_string_is_the_bodys_own_text(tmp_path: Path) -> None:
    # A function's comment was refused as a malformed line, or taken as the file's.
    sql = (
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $$\n"
        "-- pglayer:replaces see ticket 12\n"
        f"-- pglayer:replaces {'a' * 64}\n"
        "SELECT 1\n$$;\n"
        f"SELECT '\n-- pglayer:replaces {'b' * 64}\n';\n"
        f"SELECT 'it\\'s\n-- pglayer:replaces {'c' * 64}\n';\n"  # in a string, conforming off
    )
    (tmp_path / "0001_first.sql").write_text(sql)
    [m] = load_migrations(tmp_path)
    assert m.replaces == frozenset()
    assert m.checksum == hashlib.sha256(sql.encode()).hexdigest()


def test_a_replaces_line_leaves_the_files_own_checksum_as_it_was(tmp_path: Path) -> None:
    (tmp_path / "0001_first.sql").write_text("CREATE TABLE t (id int);\n")
    [before] = load_migrations(tmp_path)
    (tmp_path / "0001_first.sql").write_text(
        f"CREATE TABLE t (id int);\n-- pglayer:replaces {'a' * 64}\n"
    )
    [after] = load_migrations(tmp_path)
    assert after.checksum == before.checksum
    assert after.replaces == {"a" * 64}


async def test_a_refused_history_leaves_pglayers_tables_unapplied_too(
    empty_db_url: str, tmp_path: Path
) -> None:
    (tmp_path / "0001_first.sql").write_text("CREATE TABLE t (id int);")
    async with Database(settings_for(empty_db_url)) as db:
        await migrate(db, load_migrations(tmp_path))
        (tmp_path / "0001_first.sql").write_text("CREATE TABLE t (id bigint);")
        with pytest.raises(MigrationError, match="changed after it was applied"):
            await migrate(db, load_migrations(tmp_path), pglayer_tables=True)
        async with db.connection() as conn:
            assert await conn.fetchval("SELECT to_regclass('pglayer_idempotency_keys')") is None
        (tmp_path / "0001_first.sql").write_text("CREATE TABLE t (id int);")
        (tmp_path / "0002_second.sql").write_text("CREATE TABLE u (id int);")
        applied = await migrate(db, load_migrations(tmp_path), pglayer_tables=True)
    assert applied[-1] == "0002_second.sql"
    assert applied[0] == "pglayer/0001_idempotency_keys.sql"


async def test_an_applied_migration_renamed_with_the_same_content_is_not_applied_again(
    empty_db_url: str, tmp_path: Path
) -> None:
    (tmp_path / "0001_frist.sql").write_text("CREATE TABLE t (id int);")
    async with Database(settings_for(empty_db_url)) as db:
        assert await migrate(db, load_migrations(tmp_path)) == ["0001_frist.sql"]
        (tmp_path / "0001_frist.sql").rename(tmp_path / "0001_first.sql")
        assert await migrate(db, load_migrations(tmp_path)) == []


async def test_a_failing_migration_leaves_nothing_behind(empty_db_url: str, tmp_path: Path) -> None:
    (tmp_path / "0001_ok.sql").write_text("CREATE TABLE ok (id int);")
    (tmp_path / "0002_bad.sql").write_text("CREATE TABLE bad (id int REFERENCES nowhere);")
    async with Database(settings_for(empty_db_url)) as db:
        with pytest.raises(Exception):  # noqa: B017,PT011
            await migrate(db, load_migrations(tmp_path))
        async with db.connection() as conn:
            assert await conn.fetchval("SELECT to_regclass('ok')") is None


def test_badly_named_migration_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "first.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match=r"0001_name\.sql"):
        load_migrations(tmp_path)


def test_a_migration_name_in_upper_case_is_refused(tmp_path: Path) -> None:
    # Skipped in silence before.
    (tmp_path / "0005_x.SQL").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match=r"must look like 0001_name\.sql"):
        load_migrations(tmp_path)


@pytest.mark.parametrize("make", ["directory", "dangling link"])
def test_a_well_named_entry_that_is_not_a_file_is_refused_as_such(
    tmp_path: Path, make: str
) -> None:
    # Its name was said to be wrong, when it matched.
    if make == "directory":
        (tmp_path / "0001_dir.sql").mkdir()
    else:
        (tmp_path / "0001_link.sql").symlink_to(tmp_path / "gone.sql")
    with pytest.raises(MigrationError, match=r"0001_\w+\.sql is not a regular file"):
        load_migrations(tmp_path)


def test_a_migration_that_is_not_utf8_is_refused_saying_so(tmp_path: Path) -> None:
    (tmp_path / "0001_latin1.sql").write_bytes("SELECT 'caf\u00e9';".encode("latin-1"))
    with pytest.raises(MigrationError, match=r"0001_latin1\.sql is not UTF-8 text \(byte 0xe9"):
        load_migrations(tmp_path)


async def test_each_history_is_versioned_apart(empty_db_url: str, tmp_path: Path) -> None:
    shop, mine = tmp_path / "shop", tmp_path / "mine"
    for directory, table in ((shop, "shop_things"), (mine, "my_things")):
        directory.mkdir()
        (directory / "0001_schema.sql").write_text(f"CREATE TABLE {table} (id int);")
    async with Database(settings_for(empty_db_url)) as db:
        assert await migrate(db, load_migrations(shop), history="shop") == ["0001_schema.sql"]
        assert await migrate(db, load_migrations(mine), history="mine") == ["0001_schema.sql"]
        assert await migrate(db, load_migrations(mine), history="mine") == []
        async with db.connection() as conn:
            assert await conn.fetchval("SELECT to_regclass('my_things')") is not None


async def test_a_history_table_from_before_histories_is_upgraded(empty_db_url: str) -> None:
    async with Database(settings_for(empty_db_url)) as db, db.connection() as conn:
        await conn.execute(
            "CREATE TABLE pglayer_migrations (version text PRIMARY KEY, name text NOT NULL,"
            " checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        first = shop_migrations()[0]
        await conn.execute(
            "INSERT INTO pglayer_migrations (version, name, checksum) VALUES ($1, $2, $3)",
            first.version,
            first.name,
            first.checksum,
        )
        await conn.execute(first.sql)
        applied = [n for n in await apply_migrations(db) if not n.startswith("pglayer/")]
        assert applied == [m.name for m in shop_migrations()[1:]]


async def test_a_migration_of_only_comments_is_applied_as_nothing(
    empty_db_url: str, tmp_path: Path
) -> None:
    (tmp_path / "0001_empty.sql").write_text("")
    (tmp_path / "0002_placeholder.sql").write_text("-- later\n/* maybe */ ;\n")
    (tmp_path / "0003_table.sql").write_text("CREATE TABLE t (id int);")
    async with Database(settings_for(empty_db_url)) as db:
        applied = await migrate(db, load_migrations(tmp_path))
        assert applied == ["0001_empty.sql", "0002_placeholder.sql", "0003_table.sql"]
        assert await migrate(db, load_migrations(tmp_path)) == []


def test_two_files_of_one_version_are_named(tmp_path: Path) -> None:
    (tmp_path / "0001_a.sql").write_text("SELECT 1;")
    (tmp_path / "0001_b.sql").write_text("SELECT 2;")
    with pytest.raises(MigrationError, match=r"0001_a\.sql and 0001_b\.sql"):
        load_migrations(tmp_path)


@pytest.mark.parametrize(
    ("first", "then", "found"),
    [
        (["0001_a", "0002_b", "0003_c"], ["0001_a", "0003_c"], "applied 0002_b.sql, not in"),
        (["0001_a", "0003_c"], ["0001_a", "0002_b", "0003_c"], "0003 applied before 0002"),
        (["0004_gadgets"], ["0001_a", "0002_b"], "0004 applied before 0001, 0002"),
    ],
)
async def test_a_history_with_gaps_against_the_directory_is_refused(
    empty_db_url: str, tmp_path: Path, first: list[str], then: list[str], found: str
) -> None:
    def write(names: list[str], directory: Path) -> Path:
        directory.mkdir()
        for name in names:
            (directory / f"{name}.sql").write_text(f"CREATE TABLE {name[5:]} (id int);")
        return directory

    async def apply(names: list[str], directory: Path) -> list[str]:
        return await migrate(db, load_migrations(write(names, directory)), history="app")

    async with Database(settings_for(empty_db_url)) as db:
        assert len(await apply(first, tmp_path / "first")) == len(first)
        with pytest.raises(MigrationError, match=found) as refused:
            await apply(then, tmp_path / "then")
        assert "--history" in str(refused.value)
        async with db.connection() as conn:
            assert await conn.fetchval("SELECT count(*) FROM pglayer_migrations") == len(first)


async def test_versions_newer_than_the_directory_are_a_newer_release_and_allowed(
    empty_db_url: str, tmp_path: Path
) -> None:
    (tmp_path / "0001_a.sql").write_text("CREATE TABLE a (id int);")
    async with Database(settings_for(empty_db_url)) as db:
        await migrate(db, load_migrations(tmp_path))
        (tmp_path / "0002_b.sql").write_text("CREATE TABLE b (id int);")
        await migrate(db, load_migrations(tmp_path))
        (tmp_path / "0002_b.sql").unlink()  # the release before, rolled back to
        assert await migrate(db, load_migrations(tmp_path)) == []


async def test_a_failing_migration_says_where_in_the_file(
    empty_db_url: str, tmp_path: Path
) -> None:
    (tmp_path / "0001_typo.sql").write_text(
        "-- a table\nCREATE TABLE t (id int);\nCREATE TABLEX u ();"
    )
    async with Database(settings_for(empty_db_url)) as db:
        with pytest.raises(MigrationError, match=r"0001_typo\.sql failed at line 3, column 8: "):
            await migrate(db, load_migrations(tmp_path))


async def test_the_servers_words_on_a_failing_migration_are_bounded(
    empty_db_url: str, tmp_path: Path
) -> None:
    # The server quotes the token at fault whole: a literal not closed was its whole size.
    literal = "x" * 200_000
    (tmp_path / "0001_open.sql").write_text(f"INSERT INTO t VALUES ('{literal}\n);\n")
    async with Database(settings_for(empty_db_url)) as db:
        with pytest.raises(MigrationError) as failed:
            await migrate(db, load_migrations(tmp_path))
    said = str(failed.value)
    assert said.startswith("migration 0001_open.sql failed at line 1, column 23: unterminated")
    assert "... (200," in said, said[-200:]
    assert len(said) < 1_000


async def test_a_role_that_may_not_create_tables_finds_an_applied_schema_up_to_date(
    empty_db_url: str, admin: asyncpg.Connection[Any], tmp_path: Path
) -> None:
    directory = tmp_path / "app"
    directory.mkdir()
    (directory / "0001_notes.sql").write_text("CREATE TABLE notes (id int);")
    async with Database(settings_for(empty_db_url)) as db:
        assert await migrate(db, load_migrations(directory), history="app") == ["0001_notes.sql"]
    role = f"r_{uuid.uuid4().hex[:12]}"
    await admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw'")
    owner = await asyncpg.connect(empty_db_url)
    await owner.execute(f"GRANT SELECT ON pglayer_migrations TO {role}")  # as an app's role
    await owner.close()
    try:
        # PostgreSQL 15: only the database owner creates in `public`.
        parts = urlsplit(empty_db_url)
        as_role = f"postgresql://{role}:pw@{parts.hostname}:{parts.port}{parts.path}"
        async with Database(settings_for(as_role)) as db:
            assert await migrate(db, load_migrations(directory), history="app") == []
            (directory / "0002_more.sql").write_text("CREATE TABLE more (id int);")
            with pytest.raises(MigrationError, match="permission denied"):
                await migrate(db, load_migrations(directory), history="app")
    finally:
        owner = await asyncpg.connect(empty_db_url)
        await owner.execute(f"DROP OWNED BY {role}")
        await owner.close()
        await admin.execute(f"DROP ROLE {role}")


async def test_a_runner_waits_out_another_runs_lock_past_the_lock_bound(
    empty_db_url: str, tmp_path: Path
) -> None:
    # The advisory lock is waited for as long as the run may take, not PGLAYER_LOCK_TIMEOUT.
    (tmp_path / "0001_slow.sql").write_text("SELECT pg_sleep(1.2); CREATE TABLE s (i int);")
    settings = settings_for(empty_db_url, lock_timeout=0.3)
    async with Database(settings) as first, Database(settings) as second:
        slow = asyncio.create_task(migrate(first, load_migrations(tmp_path)))
        await asyncio.sleep(0.3)
        assert await migrate(second, load_migrations(tmp_path)) == []
        assert await slow == ["0001_slow.sql"]


async def test_a_migration_may_outlast_the_query_timeout_within_its_own(
    empty_db_url: str, tmp_path: Path
) -> None:
    (tmp_path / "0001_long.sql").write_text("SELECT pg_sleep(0.8); CREATE TABLE l (i int);")
    async with Database(settings_for(empty_db_url, query_timeout=0.3)) as db:
        with pytest.raises(MigrationError, match=r"0001_long.sql did not finish within 0.4 s"):
            await migrate(db, load_migrations(tmp_path), timeout=0.4)
        assert await migrate(db, load_migrations(tmp_path)) == ["0001_long.sql"]


async def test_checking_a_large_file_does_not_end_the_run_by_the_pools_idle_bound(
    empty_db_url: str, tmp_path: Path
) -> None:
    # The run's transaction sat idle while its files were checked (about half a second for
    # this one), and the server ended it (25P03) by the pool's idle-in-transaction bound.
    (tmp_path / "0001_many.sql").write_text("SELECT 1;\n" * 200_000)
    async with Database(settings_for(empty_db_url, idle_in_transaction_timeout=0.1)) as db:
        assert await migrate(db, load_migrations(tmp_path)) == ["0001_many.sql"]


@pytest.mark.parametrize("text", ["a", "a''", "a\\'"])
async def test_a_long_string_literal_is_checked_without_memory_in_proportion(
    empty_db_url: str, tmp_path: Path, text: str
) -> None:
    # The check's regex kept ~140 bytes per character of a literal: 5.4 GB for a 40 MB file;
    # then ~67 per escaped quote.
    size = 4_000_000
    literal = ("E'" if "\\" in text else "'") + text * (size // len(text)) + "'"
    (tmp_path / "0001_blob.sql").write_text(
        f"CREATE TABLE blob (t text); INSERT INTO blob VALUES ({literal});"
    )
    migrations = load_migrations(tmp_path)
    async with Database(settings_for(empty_db_url)) as db:
        tracemalloc.start()
        try:
            assert await migrate(db, migrations) == ["0001_blob.sql"]
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < 10 * size


async def test_a_migration_waiting_on_an_apps_lock_fails_naming_the_bound(
    empty_db_url: str, tmp_path: Path
) -> None:
    (tmp_path / "0001_t.sql").write_text("CREATE TABLE t (i int);")
    (tmp_path / "0002_alter.sql").write_text("ALTER TABLE t ADD COLUMN j int;")
    async with Database(settings_for(empty_db_url, lock_timeout=0.2)) as db:
        await migrate(db, load_migrations(tmp_path)[:1])
        holder: asyncpg.Connection[Any] = await asyncpg.connect(empty_db_url)
        try:
            async with holder.transaction():
                await holder.execute("LOCK TABLE t IN ACCESS SHARE MODE")
                with pytest.raises(MigrationError, match=r"0002_alter.sql.*PGLAYER_LOCK_TIMEOUT"):
                    await migrate(db, load_migrations(tmp_path))
        finally:
            await holder.close()


@pytest.mark.parametrize(
    "sql",
    [
        "CREATE TABLE b (i int); COMMIT;",
        "ROLLBACK; CREATE TABLE b (i int);",
        "BEGIN; CREATE TABLE b (i int); COMMIT;",
        "begin transaction isolation level serializable; CREATE TABLE b (i int); end;",
        "/* a note */ start transaction; CREATE TABLE b (i int); abort",
        # What a re-trial slipped past the first check:
        "CREATE TABLE begin (atomic int); COMMIT; CREATE TABLE b (i int);",
        "SELECT begin.atomic FROM (SELECT 1 AS atomic) AS begin; COMMIT;",
        "CREATE TABLE t (\u00e9$$ int); COMMIT; CREATE TABLE b (\u00fc$$ int);",
        "SET standard_conforming_strings = off; SELECT '\\'' ; COMMIT; --';",
    ],
)
async def test_a_migration_that_ends_the_runs_transaction_is_refused(
    empty_db_url: str, tmp_path: Path, sql: str
) -> None:
    # One run is one transaction: a COMMIT would apply the files before it, a ROLLBACK
    # undo them while the rest of the run goes on in autocommit.
    (tmp_path / "0001_a.sql").write_text("CREATE TABLE a (i int);")
    (tmp_path / "0002_b.sql").write_text(sql)
    async with Database(settings_for(empty_db_url)) as db:
        with pytest.raises(MigrationError, match=r"0002_b.sql.*transaction"):
            await migrate(db, load_migrations(tmp_path))
        tables = await db.run(
            lambda c: c.fetchval("SELECT count(*) FROM pg_tables WHERE tablename IN ('a', 'b')")
        )
    assert tables == 0


async def test_transaction_words_inside_bodies_strings_and_comments_are_not_refused(
    empty_db_url: str, tmp_path: Path
) -> None:
    (tmp_path / "0001_words.sql").write_text(
        "-- COMMIT; is only a comment\n"
        "CREATE TABLE w (note text DEFAULT 'ROLLBACK; COMMIT');\n"
        "/* BEGIN; /* nested */ COMMIT; */\n"
        "CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $body$\n"
        "BEGIN\n  RETURN 1;\nEND;\n$body$;\n"
        "CREATE FUNCTION g() RETURNS int LANGUAGE sql\n"
        "BEGIN ATOMIC\n  SELECT 1;\n  SELECT CASE WHEN true THEN 2 END;\nEND;\n"
        'CREATE TABLE "commit" (i int);\n'
        "CREATE FUNCTION h() RETURNS int LANGUAGE plpgsql\n"
        "AS $\u00e9$ BEGIN RETURN 1; END; $\u00e9$;\n"
        "SELECT 'C:\\' AS path, E'it\\'s' AS quoted;\n"
    )
    async with Database(settings_for(empty_db_url)) as db:
        assert await migrate(db, load_migrations(tmp_path)) == ["0001_words.sql"]


async def test_a_slow_migration_is_not_logged_with_its_sql(
    empty_db_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A file may hold secrets (CREATE ROLE ... PASSWORD); the slow-query log shows SQL text.
    (tmp_path / "0001_role.sql").write_text("SELECT pg_sleep(0.3); SELECT 'TopSecret123';")
    async with Database(settings_for(empty_db_url, slow_query_threshold=0.1)) as db:
        await migrate(db, load_migrations(tmp_path))
    assert "TopSecret123" not in caplog.text


async def test_a_directory_applied_under_another_history_is_refused_not_applied_again(
    empty_db_url: str, tmp_path: Path
) -> None:
    # The CLI names a history after its directory; migrate() defaults to "default".
    (tmp_path / "0001_schema.sql").write_text("CREATE TABLE IF NOT EXISTS things (id int);")
    (tmp_path / "0002_rows.sql").write_text("INSERT INTO things VALUES (1);")
    async with Database(settings_for(empty_db_url)) as db:
        await migrate(db, load_migrations(tmp_path), history="migrations")
        with pytest.raises(MigrationError, match="history 'migrations' holds these same files"):
            await migrate(db, load_migrations(tmp_path))
        async with db.connection() as conn:
            assert await conn.fetchval("SELECT count(*) FROM things") == 1


async def test_files_that_replace_texts_applied_under_another_history_are_not_applied_again(
    empty_db_url: str, tmp_path: Path
) -> None:
    # The check matched unchanged files only: a fixed file's new text ran a second time.
    (tmp_path / "0001_schema.sql").write_text("CREATE TABLE IF NOT EXISTS things (id int);")
    (tmp_path / "0002_rows.sql").write_text("INSERT INTO things VALUES (1);")
    async with Database(settings_for(empty_db_url)) as db:
        await migrate(db, load_migrations(tmp_path), history="migrations")
        [_, rows] = load_migrations(tmp_path)
        (tmp_path / "0002_rows.sql").write_text(
            f"INSERT INTO things VALUES (1); -- a fixed typo\n-- pglayer:replaces {rows.checksum}\n"
        )
        with pytest.raises(MigrationError, match="history 'migrations' holds these same files"):
            await pending_migrations(db, load_migrations(tmp_path))
        with pytest.raises(MigrationError, match="history 'migrations' holds these same files"):
            await migrate(db, load_migrations(tmp_path))
        async with db.connection() as conn:
            assert await conn.fetchval("SELECT count(*) FROM things") == 1


async def test_files_renamed_since_another_history_applied_them_are_not_applied_again(
    empty_db_url: str, tmp_path: Path
) -> None:
    # Taken as applied under their own history (renamed, the same SQL), they ran again
    # under a new one.
    (tmp_path / "0001_rows.sql").write_text(
        "CREATE TABLE things (id int); INSERT INTO things VALUES (1);"
    )
    async with Database(settings_for(empty_db_url)) as db:
        await migrate(db, load_migrations(tmp_path), history="migrations")
        (tmp_path / "0001_rows.sql").rename(tmp_path / "0001_renamed.sql")
        with pytest.raises(MigrationError, match="history 'migrations' holds these same files"):
            await migrate(db, load_migrations(tmp_path))
        async with db.connection() as conn:
            assert await conn.fetchval("SELECT count(*) FROM things") == 1


async def test_another_apps_history_that_shares_a_first_file_does_not_stop_a_new_one(
    empty_db_url: str, tmp_path: Path
) -> None:
    billing, notes = tmp_path / "billing", tmp_path / "notes"
    for directory, table in ((billing, "bills"), (notes, "notes")):
        directory.mkdir()
        (directory / "0001_extensions.sql").write_text("CREATE EXTENSION IF NOT EXISTS citext;")
        (directory / "0002_schema.sql").write_text(f"CREATE TABLE {table} (id int);")
    async with Database(settings_for(empty_db_url)) as db:
        await migrate(db, load_migrations(billing), history="billing")
        assert len(await migrate(db, load_migrations(notes), history="notes")) == 2


async def test_migrate_given_a_directory_instead_of_its_files_says_what_it_takes(
    db: Database, tmp_path: Path
) -> None:
    with pytest.raises(TypeError, match=r"load_migrations\(Path"):
        await migrate(db, tmp_path)  # type: ignore[arg-type]


async def test_a_history_named_by_its_caller_is_taken_as_given(
    empty_db_url: str, tmp_path: Path
) -> None:
    # Another app whose files begin with all of this one's: named, the two stay apart.
    small, large = tmp_path / "small", tmp_path / "large"
    for directory in (small, large):
        directory.mkdir()
        (directory / "0001_extensions.sql").write_text("CREATE EXTENSION IF NOT EXISTS citext;")
    (large / "0002_schema.sql").write_text("CREATE TABLE larger (id int);")
    async with Database(settings_for(empty_db_url)) as db:
        await migrate(db, load_migrations(small), history="small")
        assert len(await migrate(db, load_migrations(large), history="large")) == 2


async def test_a_history_named_as_another_but_for_its_case_is_refused(
    empty_db_url: str, tmp_path: Path
) -> None:
    (tmp_path / "0001_a.sql").write_text("CREATE TABLE a (id int);")
    async with Database(settings_for(empty_db_url)) as db:
        await migrate(db, load_migrations(tmp_path), history="many")
        with pytest.raises(MigrationError, match="history 'many' holds these same files"):
            await migrate(db, load_migrations(tmp_path), history="Many")


@pytest.mark.parametrize("history", ["many ", " many", "\tmany"])
async def test_a_history_name_with_spaces_around_it_is_refused(
    db: Database, tmp_path: Path, history: str
) -> None:
    (tmp_path / "0001_a.sql").write_text("CREATE TABLE a (id int);")
    with pytest.raises(MigrationError, match="spaces around it"):
        await migrate(db, load_migrations(tmp_path), history=history)


async def test_a_file_an_editor_saved_with_a_byte_order_mark_applies(
    empty_db_url: str, tmp_path: Path
) -> None:
    (tmp_path / "0001_a.sql").write_bytes(b"\xef\xbb\xbfCREATE TABLE bom (id int);")
    async with Database(settings_for(empty_db_url)) as db:
        assert await migrate(db, load_migrations(tmp_path)) == ["0001_a.sql"]


async def test_a_file_between_block_comments_is_run_not_taken_for_comments(
    empty_db_url: str, tmp_path: Path
) -> None:
    # The comments-only check ran from the first `/*` to the last `*/`: recorded, never run.
    sql = "/* header */\nCREATE TABLE between_comments (id int);\n" + "/* x */\n" * 40
    (tmp_path / "0001_between.sql").write_text(sql)
    async with Database(settings_for(empty_db_url)) as db:
        assert await migrate(db, load_migrations(tmp_path)) == ["0001_between.sql"]
        async with db.connection() as conn:
            assert await conn.fetchval("SELECT to_regclass('between_comments')") is not None


PGLAYER_FILES = [
    f"pglayer/{m.name}" for m in load_migrations(Path(pglayer.__file__).parent / "_sql")
]


def app_directory(root: Path, app: str, sql: str, name: str = "0001_init.sql") -> Path:
    """`root/app/migrations` with one file (the usual layout)."""
    directory = root / app / "migrations"
    directory.mkdir(parents=True)
    (directory / name).write_text(sql)
    return directory


def two_apps(
    root: Path, first: str = "0001_bills.sql", second: str = "0001_notes.sql"
) -> tuple[Path, Path]:
    """Two apps' `migrations/` directories, each with one first file."""
    return (
        app_directory(root, "billing", "CREATE TABLE bills (id int);", first),
        app_directory(root, "notes", "CREATE TABLE notes (id int);", second),
    )


def seeding_app(root: Path) -> Path:
    """An app's `migrations/` whose second file inserts a row: run twice, it doubles."""
    directory = app_directory(root, "billing", "CREATE TABLE IF NOT EXISTS bills (id int);")
    (directory / "0002_seed.sql").write_text("INSERT INTO bills VALUES (1);")
    return directory


async def bills(settings: DatabaseSettings) -> int:
    async with Database(settings) as db:
        return int(await db.run(lambda conn: conn.fetchval("SELECT count(*) FROM bills")))


async def test_two_apps_directories_of_one_name_keep_their_histories_apart(
    empty_db_url: str, tmp_path: Path
) -> None:
    # Both named `migrations`: the second was refused as the first's with a file changed.
    first, second = two_apps(tmp_path)
    settings = settings_for(empty_db_url)
    assert await apply_directories(settings, [first]) == [
        *PGLAYER_FILES,
        "migrations/0001_bills.sql",
    ]
    assert await apply_directories(settings, [second]) == ["notes/migrations/0001_notes.sql"]
    (second / "0002_more.sql").write_text("ALTER TABLE notes ADD COLUMN body text;")
    assert await apply_directories(settings, [second]) == ["notes/migrations/0002_more.sql"]
    assert await apply_directories(settings, [first]) == []
    moved = tmp_path / "elsewhere" / "migrations"  # the first app deployed at another path
    (tmp_path / "billing").rename(tmp_path / "elsewhere")
    assert await apply_directories(settings, [moved]) == []


@pytest.mark.parametrize("edit", ["-- a header\n{}", "{}\n-- reformatted"])
async def test_a_directory_whose_every_file_was_edited_is_refused_not_run_again(
    empty_db_url: str, tmp_path: Path, edit: str
) -> None:
    # Taken for another app's (no text in common), its files ran again: rows doubled.
    directory = seeding_app(tmp_path)
    settings = settings_for(empty_db_url)
    await apply_directories(settings, [directory])
    for path in directory.glob("*.sql"):
        path.write_text(edit.format(path.read_text()))
    with pytest.raises(MigrationError, match=r"0001_init\.sql was changed after it was applied"):
        await apply_directories(settings, [directory])
    assert await bills(settings) == 1  # its seed ran once


async def test_another_apps_history_with_a_file_of_the_same_name_is_refused_naming_history(
    empty_db_url: str, tmp_path: Path
) -> None:
    # Told by neither name nor text from this directory's own files, changed: refused.
    first, second = two_apps(tmp_path, "0001_init.sql", "0001_init.sql")
    settings = settings_for(empty_db_url)
    await apply_directories(settings, [first])
    with pytest.raises(MigrationError, match="give it its own: `--history NAME`"):
        await apply_directories(settings, [second])
    assert await apply_directories(settings, [second], histories=["notes"]) == [
        "notes/0001_init.sql"
    ]


async def test_two_directories_of_one_name_in_one_run_get_a_history_each(
    empty_db_url: str, tmp_path: Path
) -> None:
    # Both were "migrations" in the run: its second INSERT of version 0001 failed as
    # "a row with the same unique values already exists".
    first, second = two_apps(tmp_path, "0001_init.sql", "0001_init.sql")
    applied = await apply_directories(settings_for(empty_db_url), [first, second])
    assert applied[-2:] == ["migrations/0001_init.sql", "notes/migrations/0001_init.sql"]
    with pytest.raises(ConfigurationError, match="two --history names are the same"):
        await apply_directories(settings_for(empty_db_url), [first, second], histories=["a", "a"])
    again = first.parent / ".." / "billing" / "migrations"  # the same, by another path
    with pytest.raises(ConfigurationError, match=r"given twice: .*billing/migrations and "):
        await apply_directories(settings_for(empty_db_url), [first, again])


async def test_a_directory_applied_alone_keeps_its_history_when_run_with_another_of_its_name(
    empty_db_url: str, tmp_path: Path
) -> None:
    # The second app's deploy (both in one run) was refused: the first had been renamed.
    first, second = two_apps(tmp_path)
    settings = settings_for(empty_db_url)
    await apply_directories(settings, [second])  # "migrations": the notes app's
    applied = await apply_directories(settings, [first, second])
    assert applied == ["billing/migrations/0001_bills.sql"]
    assert await apply_directories(settings, [first, second]) == []


async def test_a_renamed_file_edited_later_is_refused_not_run_again(
    empty_db_url: str, tmp_path: Path
) -> None:
    # The rename was taken as applied but not recorded: the edit after it left nothing in
    # common by name or text, the directory was taken for another app's, and its file ran
    # again (rows doubled).
    directory = seeding_app(tmp_path)
    settings = settings_for(empty_db_url)
    await apply_directories(settings, [directory])
    for path in directory.glob("*.sql"):
        path.rename(path.with_name(path.name.replace(".sql", "_renamed.sql")))
    assert await apply_directories(settings, [directory]) == []
    for path in directory.glob("*.sql"):
        path.write_text(f"-- SPDX-License-Identifier: MIT\n{path.read_text()}")
    with pytest.raises(MigrationError, match="was changed after it was applied"):
        await apply_directories(settings, [directory])
    assert await bills(settings) == 1  # its seed ran once
