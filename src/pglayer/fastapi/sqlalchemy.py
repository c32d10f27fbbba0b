"""The `SqlSession` dependency: an `AsyncSession` that commits before the response is sent."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from pglayer._database import Database
from pglayer._errors import ConfigurationError
from pglayer.fastapi._dependencies import STATE_KEY
from pglayer.fastapi._lifespan import wrap_lifespan
from pglayer.sqlalchemy import count_engine, session_transaction

__all__ = ["SqlSession", "setup_sqlalchemy"]

_STATE_KEY = "pglayer_sessions"


def setup_sqlalchemy(app: FastAPI, engine: AsyncEngine) -> None:
    """Bind `engine` to `app` (disposed at shutdown); use with `setup()` for problem responses.

    After `setup(app, db)`, the engine's pool counts in `db`'s budget and stats.
    """
    if getattr(app.state, _STATE_KEY, None) is not None:
        raise ConfigurationError("an engine is already bound to this app (setup_sqlalchemy)")
    setattr(app.state, _STATE_KEY, async_sessionmaker(engine, expire_on_commit=False))
    db = getattr(app.state, STATE_KEY, None)
    if isinstance(db, Database):
        count_engine(db, engine)

    async def dispose() -> None:
        await engine.dispose()

    wrap_lifespan(app, on_shutdown=dispose)


async def _session(request: Request) -> AsyncIterator[AsyncSession]:
    sessions = getattr(request.app.state, _STATE_KEY, None)
    if sessions is None:
        raise ConfigurationError("no engine bound to this app: call setup_sqlalchemy()")
    async with session_transaction(sessions) as session:
        yield session


_session.pglayer_commits = True  # type: ignore[attr-defined]  # one transaction per route
SqlSession = Annotated[AsyncSession, Depends(_session, scope="function")]
"""A session in a transaction, committed (or its failure answered) before the response."""
