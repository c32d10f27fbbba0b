"""`pglayer.idempotency`: a key and body give one write and the same answer, even at once."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from importlib.resources import files
from typing import Any, assert_type

import asyncpg
import pytest
from pydantic import BaseModel, TypeAdapter

from pglayer import Connection, Database, IdempotencyKeys, body_hash
from pglayer._errors import IdempotencyKeyReusedError
from pglayer.migrations import install_pglayer_tables as install
from pglayer.migrations import load_migrations, migrate
from tests.conftest import Server, settings_for

NOTES = "CREATE TABLE notes (id bigserial PRIMARY KEY, body text NOT NULL)"


async def add_note(conn: Connection) -> dict[str, Any]:
    note_id = await conn.fetchval("INSERT INTO notes (body) VALUES ('x') RETURNING id")
    await asyncio.sleep(0.05)  # hold the key's row lock while others arrive
    return {"id": note_id}


@pytest.fixture
async def keys(db: Database) -> IdempotencyKeys:
    await install(db)
    await db.run(lambda conn: conn.execute(NOTES))
    return IdempotencyKeys(ttl=60)


async def test_concurrent_requests_with_one_key_write_once(
    db: Database, keys: IdempotencyKeys
) -> None:
    digest = body_hash({"body": "x"})

    async def request() -> tuple[dict[str, Any], bool]:
        return await db.run_in_transaction(
            lambda conn: keys.run(conn, "notes", "k-1", digest, add_note)
        )

    results = await asyncio.gather(*(request() for _ in range(8)))
    assert {result["id"] for result, _ in results} == {1}
    assert sorted(replayed for _, replayed in results) == [False] + [True] * 7
    assert await db.run(lambda conn: conn.fetchval("SELECT count(*) FROM notes")) == 1


async def test_a_key_with_another_body_is_refused(db: Database, keys: IdempotencyKeys) -> None:
    await db.run_in_transaction(lambda c: keys.run(c, "notes", "k", body_hash(b"a"), add_note))
    with pytest.raises(IdempotencyKeyReusedError):
        await db.run_in_transaction(lambda c: keys.run(c, "notes", "k", body_hash(b"b"), add_note))


async def test_scopes_do_not_share_keys(db: Database, keys: IdempotencyKeys) -> None:
    for scope in ("notes", "other"):
        _, replayed = await db.run_in_transaction(
            lambda c, s=scope: keys.run(c, s, "k", body_hash(b"a"), add_note)  # type: ignore[misc]
        )
        assert not replayed


async def test_a_rolled_back_write_leaves_no_key(db: Database, keys: IdempotencyKeys) -> None:
    async def failing(conn: Connection) -> dict[str, Any]:
        await add_note(conn)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        await db.run_in_transaction(lambda c: keys.run(c, "notes", "k", body_hash(b"a"), failing))
    _, replayed = await db.run_in_transaction(
        lambda c: keys.run(c, "notes", "k", body_hash(b"a"), add_note)
    )
    assert not replayed


async def test_a_key_outside_a_transaction_is_refused_before_it_is_claimed(
    db: Database, keys: IdempotencyKeys
) -> None:
    for key in ("k", None):  # without a key too: the mistake shows before keys are sent
        with pytest.raises(TypeError, match="in a transaction"):
            await db.run(lambda c, k=key: keys.run(c, "notes", k, body_hash(b"a"), add_note))  # type: ignore[misc]
    claimed = await db.run(lambda c: c.fetchval("SELECT count(*) FROM pglayer_idempotency_keys"))
    assert claimed == 0
    assert await db.run(lambda c: c.fetchval("SELECT count(*) FROM notes")) == 0


async def test_expired_keys_are_taken_over_and_swept(db: Database, keys: IdempotencyKeys) -> None:
    await db.run_in_transaction(lambda c: keys.run(c, "notes", "old", body_hash(b"a"), add_note))
    await db.run(
        lambda conn: conn.execute(
            "UPDATE pglayer_idempotency_keys SET expires_at = now() - interval '1 second'"
        )
    )
    _, replayed = await db.run_in_transaction(
        lambda c: keys.run(c, "notes", "old", body_hash(b"b"), add_note)
    )
    assert not replayed  # a new body is fine once the key expired
    await db.run(
        lambda conn: conn.execute(
            "UPDATE pglayer_idempotency_keys SET expires_at = now() - interval '1 second'"
        )
    )
    assert await keys.expire(db, batch=1) == 1


def test_a_body_with_decimals_hashes_as_its_json() -> None:
    # `model_dump()` of a money field: a 500 on every request of the route before.
    at = datetime(2026, 11, 28, 6, 0, tzinfo=UTC)  # hashed as before: keys stored stay good
    assert body_hash({"amount": Decimal("10.50"), "at": at}) == body_hash(
        {"amount": "10.50", "at": "2026-11-28T06:00:00+00:00"}
    )


class Balance(BaseModel):
    amount: Decimal


async def deposit(conn: Connection) -> Balance:
    return Balance(amount=await conn.fetchval("SELECT 110.00::numeric"))


@pytest.mark.parametrize("returns", [Balance, None])
async def test_a_replay_returns_what_the_first_call_returned(
    db: Database, keys: IdempotencyKeys, returns: type[Balance] | None
) -> None:
    # The replay came back as stored JSON (a dict where the first call had a model, a str
    # where it had a Decimal): handler code that worked the first time failed on replays.
    async def call() -> tuple[Any, bool]:
        return await db.run_in_transaction(
            lambda c: keys.run(c, "deposits", "k", body_hash(b"a"), deposit, returns=returns)
        )

    first, replayed_first = await call()
    again, replayed_again = await call()
    assert (replayed_first, replayed_again) == (False, True)
    assert type(first) is type(again)
    assert first == again
    assert first == (Balance(amount=Decimal("110.00")) if returns else {"amount": "110.00"})


async def test_a_type_adapter_types_a_result_that_is_not_a_class(
    db: Database, keys: IdempotencyKeys
) -> None:
    # `returns=Balance | None` worked but mypy refused it (a union is not a `type[T]`).
    async def nothing(conn: Connection) -> Balance | None:
        return None

    maybe = TypeAdapter(Balance | None)
    for replay in (False, True):
        result, replayed = await db.run_in_transaction(
            lambda c: keys.run(c, "maybe", "k", body_hash(b"a"), nothing, returns=maybe)
        )
        assert_type(result, Balance | None)  # checked by mypy
        assert (result, replayed) == (None, replay)


async def test_without_a_key_the_result_is_what_a_replay_would_return(
    db: Database, keys: IdempotencyKeys
) -> None:
    result, replayed = await db.run_in_transaction(
        lambda c: keys.run(c, "deposits", None, body_hash(b"a"), deposit)
    )
    assert (result, replayed) == ({"amount": "110.00"}, False)


async def test_a_sweep_deletes_only_the_keys_past_their_own_ttl(db: Database) -> None:
    # The table is shared: a cart's one-second keys were swept with a payment's week-long
    # one, whose work then ran again when its key came back.
    await install(db)
    payments, carts = IdempotencyKeys(ttl=7 * 86_400), IdempotencyKeys(ttl=0.001)

    async def pay(conn: Connection) -> int:
        return 1

    await db.run_in_transaction(lambda c: payments.run(c, "payments", "pay-1", "h", pay))
    await db.run_in_transaction(lambda c: carts.run(c, "carts", "cart-1", "h", pay))
    await asyncio.sleep(0.01)
    assert await carts.expire(db) == 1  # the cart's own
    _, replayed = await db.run_in_transaction(
        lambda c: payments.run(c, "payments", "pay-1", "h", pay)
    )
    assert replayed


async def test_a_lifespan_sweeping_deletes_expired_keys_and_stops_with_it(db: Database) -> None:
    await install(db)
    keys = IdempotencyKeys(ttl=0.001)

    async def one(conn: Connection) -> int:
        return 1

    await db.run_in_transaction(lambda c: keys.run(c, "notes", "note-1", "h", one))
    count = "SELECT count(*) FROM pglayer_idempotency_keys"
    async with keys.sweeping(db, interval=0.05):
        for _ in range(100):
            if not await db.run(lambda c: c.fetchval(count)):
                break
            await asyncio.sleep(0.05)
    assert await db.run(lambda c: c.fetchval(count)) == 0
    tasks = [t for t in asyncio.all_tasks() if "sweep_forever" in repr(t.get_coro())]
    assert not [t for t in tasks if not t.done()]


async def test_keys_claimed_before_expiry_per_key_keep_the_ttl_of_whoever_reads_them(
    server: Server, admin: asyncpg.Connection[Any]
) -> None:
    # Cut to a day at the upgrade, a week-long key two days old was swept and its work ran
    # again; it keeps the rule it was claimed under.
    name = (
        f"t_up_{uuid.uuid4().hex[:12]}"  # no template: pglayer's tables as an older one left them
    )
    await admin.execute(f"CREATE DATABASE {name}")
    try:
        async with Database(settings_for(server.url_for(name))) as db:
            earlier = [m for m in load_migrations(files("pglayer") / "_sql") if m.version < "0004"]
            await migrate(db, earlier, history="pglayer")
            await db.run(
                lambda c: c.execute(
                    "INSERT INTO pglayer_idempotency_keys"
                    " (scope, key, request_hash, response, created_at)"
                    " VALUES ('notes', 'k', 'h', '{\"id\": 1}', now() - interval '2 days')"
                )
            )
            assert await install(db) == ["0004_idempotency_expiry_per_key.sql"]
            week = IdempotencyKeys(ttl=7 * 86_400)
            assert await week.expire(db) == 0
            replayed = await db.run_in_transaction(
                lambda c: week.run(c, "notes", "k", "h", add_note)
            )
            assert replayed == ({"id": 1}, True)
            assert await IdempotencyKeys(ttl=86_400).expire(db) == 1  # past a day's TTL
    finally:
        await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
