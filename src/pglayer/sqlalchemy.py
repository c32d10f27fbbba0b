"""Optional SQLAlchemy support (`pip install 'pglayer[sqlalchemy]'`).

An `AsyncEngine` built from pglayer's settings (same timeouts, same startup parameters,
same pool bounds) and the translation of SQLAlchemy's errors into pglayer's. Pick it over
plain asyncpg when a team already models its domain with the ORM; plain asyncpg is leaner
and faster for hand-written SQL.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import sqlalchemy.exc
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from pglayer.errors import ConnectionLostError, PoolTimeoutError, translate
from pglayer.settings import DatabaseSettings

__all__ = ["create_engine", "session_transaction", "translate_sqlalchemy"]


def create_engine(settings: DatabaseSettings) -> AsyncEngine:
    """An asyncpg-backed engine whose pool has pglayer's sizes, deadlines and settings."""
    url = make_url(settings.dsn()).set(drivername="postgresql+asyncpg")
    return create_async_engine(
        url,
        pool_size=settings.max_size,
        max_overflow=0,
        pool_timeout=settings.acquire_timeout,
        pool_recycle=settings.max_inactive_connection_lifetime,
        connect_args={
            "server_settings": settings.server_settings(),
            "command_timeout": settings.query_timeout,
            "timeout": settings.connect_timeout,
        },
    )


def translate_sqlalchemy(exc: BaseException) -> BaseException:
    """Map a SQLAlchemy error to a pglayer error by the driver error underneath it."""
    if isinstance(exc, sqlalchemy.exc.TimeoutError):
        return PoolTimeoutError()
    if isinstance(exc, sqlalchemy.exc.DBAPIError):
        # SQLAlchemy raises its adapted error `from` asyncpg's exception.
        driver_error = exc.orig.__cause__ if exc.orig is not None else None
        if driver_error is not None:
            translated = translate(driver_error, connection_closed=exc.connection_invalidated)
            if translated is not driver_error:
                return translated
        if exc.connection_invalidated:
            return ConnectionLostError()
    return exc


@asynccontextmanager
async def session_transaction(
    sessions: async_sessionmaker[AsyncSession],
) -> AsyncIterator[AsyncSession]:
    """A session in a transaction: committed when the block succeeds, else rolled back."""
    try:
        async with sessions() as session, session.begin():
            yield session
    except Exception as exc:
        translated = translate_sqlalchemy(exc)
        if translated is exc:
            raise
        raise translated from exc
