"""The shop's schema: its migrations, applied through pglayer's migration runner."""

from __future__ import annotations

from importlib.resources import files

from pglayer import Database
from pglayer.migrations import Migration, install_pglayer_tables, load_migrations, migrate

__all__ = ["apply_migrations", "shop_migrations"]


def shop_migrations() -> list[Migration]:
    """The shop's migrations, in order."""
    return load_migrations(files("pglayer_shop") / "migrations")


async def apply_migrations(db: Database) -> list[str]:
    """Apply pglayer's own tables, then the shop's pending migrations; return their names."""
    await install_pglayer_tables(db)  # the shop's 0005 moves its keys into pglayer's table
    return await migrate(db, shop_migrations())
