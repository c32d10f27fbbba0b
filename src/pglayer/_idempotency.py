"""Idempotency keys for any write: the same key and body give the same answer, once.

The key is inserted first, in the write's own transaction. A concurrent request with the same
key waits on that row until the first one's transaction ends, then finds the stored response
and replays it; if the first one rolled back, so did its key, and the retry does the work. A
key sent with another body is refused (`IdempotencyKeyReusedError`, 422). A key expires
`ttl` seconds after its claim (the claiming instance's `ttl`); an expired key counts as gone
and is taken over, and `expire()` deletes expired keys, whoever claimed them, in small batches.

`pglayer.migrations.install_pglayer_tables(db)` creates its table (`pglayer serve`,
`pglayer migrate` and `pglayer.testing` call it).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar, overload

import orjson
from pydantic import TypeAdapter

from pglayer._connection import Connection
from pglayer._database import Database
from pglayer._errors import IdempotencyKeyReusedError, PglayerError
from pglayer._json import default, dumps

__all__ = ["IdempotencyKeys", "body_hash"]

log = logging.getLogger("pglayer.idempotency")
T = TypeVar("T")

_CLAIM = """
INSERT INTO pglayer_idempotency_keys (scope, key, request_hash, expires_at)
VALUES ($1, $2, $3, now() + make_interval(secs => $4))
ON CONFLICT (scope, key) DO UPDATE
    SET request_hash = EXCLUDED.request_hash, response = NULL, created_at = now(),
        expires_at = EXCLUDED.expires_at
    WHERE coalesce(
        pglayer_idempotency_keys.expires_at,
        pglayer_idempotency_keys.created_at + make_interval(secs => $4)
    ) < now()
RETURNING true
"""
_STORED = (
    "SELECT request_hash, response FROM pglayer_idempotency_keys WHERE scope = $1 AND key = $2"
)
# Stored as the text pglayer sends (a cast from text: no codec in between).
_STORE = (
    "UPDATE pglayer_idempotency_keys SET response = $3::text::json WHERE scope = $1 AND key = $2"
)
_SWEEP = """
WITH doomed AS (
    SELECT scope, key FROM pglayer_idempotency_keys
    WHERE expires_at < now()
       OR (expires_at IS NULL AND created_at < now() - make_interval(secs => $2))
    LIMIT $1
    FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM pglayer_idempotency_keys AS k USING doomed
    WHERE k.scope = doomed.scope AND k.key = doomed.key RETURNING 1
)
SELECT count(*) FROM gone
"""


def body_hash(body: Any) -> str:
    """What a key is bound to: a digest of the request body (bytes, or what pglayer's JSON
    writes: a `model_dump()` with Decimals, UUIDs, records)."""
    raw = (
        body
        if isinstance(body, bytes)
        else orjson.dumps(body, default=default, option=orjson.OPT_SORT_KEYS)
    )
    return hashlib.sha256(raw).hexdigest()


@functools.cache
def _adapter(returns: Any) -> TypeAdapter[Any]:
    return returns if isinstance(returns, TypeAdapter) else TypeAdapter(returns)


def _as(returns: Any, written: bytes) -> Any:
    """A result as a replay returns it: its JSON, or that validated into `returns`."""
    if returns is None:
        return orjson.loads(written)
    return _adapter(returns).validate_json(written)


class IdempotencyKeys:
    """Runs writes at most once per (scope, key), storing each one's JSON response."""

    def __init__(self, *, ttl: float = 86_400.0) -> None:
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        self.ttl = ttl

    @overload
    async def run(
        self,
        conn: Connection,
        scope: str,
        key: str | None,
        request_hash: str,
        work: Callable[[Connection], Awaitable[object]],
        *,
        returns: type[T] | TypeAdapter[T],
    ) -> tuple[T, bool]: ...

    @overload
    async def run(
        self,
        conn: Connection,
        scope: str,
        key: str | None,
        request_hash: str,
        work: Callable[[Connection], Awaitable[object]],
        *,
        returns: None = None,
    ) -> tuple[Any, bool]: ...

    async def run(
        self,
        conn: Connection,
        scope: str,
        key: str | None,
        request_hash: str,
        work: Callable[[Connection], Awaitable[object]],
        *,
        returns: Any = None,
    ) -> tuple[Any, bool]:
        """`work(conn)` inside the caller's transaction, or the stored result; and whether
        it was replayed.

        The result is stored as pglayer's JSON responses write it (records, Decimals as
        strings, UTC datetimes as "…Z"), and every call returns it in that form, replay or
        not, key or none, so code that works on the first answer works on a replay; or,
        with `returns` (a model, `Decimal`, `list[Order]`…), validated into that type; a
        type that is not a class (`Order | None`) is typed as `TypeAdapter(Order | None)`."""
        if not conn.raw.is_in_transaction():
            # In autocommit the claim would commit alone: a failed `work` would leave the
            # key spent with no answer stored, and every resend would replay nothing. Said
            # without a key too, so that the mistake shows before clients send keys.
            raise TypeError(
                "IdempotencyKeys.run needs a connection in a transaction"
                " (db.run_in_transaction, WriteTransaction, @transactional)"
            )
        if key is None:
            return _as(returns, dumps(await work(conn))), False
        fresh = await conn.fetchval(_CLAIM, scope, key, request_hash, self.ttl)
        if not fresh:
            stored = await conn.fetchrow(_STORED, scope, key)
            assert stored is not None  # the claim's row, committed by the first request
            if stored["request_hash"] != request_hash:
                raise IdempotencyKeyReusedError()
            response = stored["response"]
            return (
                response if returns is None else _adapter(returns).validate_python(response)
            ), True
        written = dumps(await work(conn))
        await conn.execute(_STORE, scope, key, written.decode())
        return _as(returns, written), False

    async def expire(self, db: Database, *, batch: int = 500) -> int:
        """Delete expired keys, `batch` at a time, each batch its own transaction that skips
        keys in use (no request waits on it); return how many. Each key expires by the `ttl`
        of the instance that claimed it: the table is shared by every instance and scope.
        (A key claimed by a release before 0004 has no expiry of its own: this `ttl`.)"""
        deleted = 0
        while True:
            count: int = await db.run(
                lambda conn: conn.fetchval(_SWEEP, batch, self.ttl), retry=False
            )
            deleted += count
            if count < batch:
                return deleted
            await asyncio.sleep(0)  # let requests in between batches

    async def sweep_forever(self, db: Database, interval: float = 60.0) -> None:
        """`expire(db)` every `interval` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval)
            try:
                deleted = await self.expire(db)
            except PglayerError as exc:
                log.warning("idempotency key sweep failed (%s)", type(exc).__name__)
                continue
            if deleted:
                log.info("deleted %d expired idempotency keys", deleted)

    @contextlib.asynccontextmanager
    async def sweeping(self, db: Database, interval: float = 60.0) -> AsyncIterator[None]:
        """`sweep_forever` for the block's life, as an app's lifespan: without a sweep the
        expired keys stay, and the table grows with every key ever sent."""
        sweep = asyncio.create_task(self.sweep_forever(db, interval))
        try:
            yield
        finally:
            sweep.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweep
