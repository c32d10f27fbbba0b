"""The shop's schema: its migrations, applied through pglayer's migration runner."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from pglayer import Database
from pglayer.migrations import Migration, load_migrations, migrate, pending_migrations

__all__ = ["HISTORY", "apply_migrations", "migrations_directory", "pending", "shop_migrations"]

HISTORY = "default"  # the shop's history: it came before histories had names


def migrations_directory() -> Path:
    """Where the shop's migration files are (an installed package's directory)."""
    return Path(str(files("pglayer_shop") / "migrations"))


def shop_migrations() -> list[Migration]:
    """The shop's migrations, in order."""
    return load_migrations(migrations_directory())


async def apply_migrations(db: Database) -> list[str]:
    """Apply pglayer's own tables, then the shop's pending migrations, in one transaction;
    return their names (pglayer's as `pglayer/NAME`)."""
    # pglayer's first: the shop's 0005 moves its keys into pglayer's table.
    return await migrate(db, shop_migrations(), pglayer_tables=True)


async def pending(db: Database) -> list[str]:
    """The migrations `apply_migrations` would apply (see `pending_migrations`)."""
    return await pending_migrations(db, shop_migrations(), pglayer_tables=True)
