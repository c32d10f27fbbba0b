"""The cursors that sign the shop's pages."""

from __future__ import annotations

from fastapi import Request

from pglayer import Database
from pglayer.fastapi import Cursors

__all__ = ["cursors_of"]


async def cursors_of(request: Request, db: Database) -> Cursors:
    """`PGLAYER_CURSOR_SECRET`'s cursors, else those of the secret kept in the database, read
    at the first page asked for (the app starts while the database is down)."""
    state = request.app.state
    cursors: Cursors | None = getattr(state, "cursors", None)
    if cursors is None:
        # Two first requests at once both read it: the same secret, no lock needed.
        cursors = state.cursors = await Cursors.from_database(db)
    return cursors
