"""Emails are unique after Unicode NFC normalisation and full case folding, in any locale."""

from __future__ import annotations

import re
import unicodedata
import uuid
from collections.abc import AsyncIterator
from importlib.resources import files
from typing import Any

import asyncpg
import httpx
import pytest
from pglayer_shop.schema import apply_migrations, shop_migrations

from pglayer import Database, UniqueViolationError
from pglayer.migrations import MigrationError, migrate
from tests.conftest import Server, settings_for
from tests.email_key_sql import migration_sql
from tests.test_shop_users import assert_problem, create_user

# The migrations before emails were keyed by NFC + case folding (`lower(email)` until then).
BEFORE_KEYS = 3


def reference_key(email: str) -> str:
    """Unicode canonical caseless matching (D145), written as an NFC string."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFD", email).casefold())


def nfd(text: str) -> str:
    return unicodedata.normalize("NFD", text)


async def test_nfc_and_nfd_forms_of_one_email_are_one_user(client: httpx.AsyncClient) -> None:
    user = await create_user(client, "Zoë", nfd("zoë@exämple.com"))
    assert user["email"] == nfd("zoë@exämple.com")  # stored as given: it round-trips
    assert (await client.get(f"/users/{user['id']}")).json()["email"] == nfd("zoë@exämple.com")
    response = await client.post("/users", json={"name": "Zoe", "email": "zoë@exämple.com"})
    assert_problem(response, 409, "conflict")
    response = await client.post("/users", json={"name": "Zoe", "email": nfd("ZOË@EXÄMPLE.COM")})
    assert_problem(response, 409, "conflict")


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("straße@example.com", "STRASSE@example.com"),
        ("ÉLODIE@example.com", "élodie@example.com"),  # lower() in the C locale leaves É
        ("ΣΊΣΥΦΟΣ@example.gr", "σίσυφος@example.gr"),  # final sigma folds to the medial one
        ("ﬁle@example.com", "FILE@example.com"),
        ("kelvin\u212a@example.com", "KELVINK@example.com"),  # KELVIN SIGN
        ("ǆ@example.com", "Ǆ@example.com"),
    ],
)
async def test_emails_equal_after_case_folding_are_taken(
    client: httpx.AsyncClient, first: str, second: str
) -> None:
    await create_user(client, "First", first)
    response = await client.post("/users", json={"name": "Second", "email": second})
    assert_problem(response, 409, "conflict")


async def test_emails_that_differ_beyond_case_are_different_users(
    client: httpx.AsyncClient,
) -> None:
    for email in ("ana@example.com", "aná@example.com", "ana@example.org", "ana.b@example.com"):
        await create_user(client, "Ana", email)


async def test_every_writer_gets_the_same_uniqueness_and_keeps_its_form(db: Database) -> None:
    async with db.connection() as conn:
        stored = await conn.fetchval(
            "INSERT INTO users (name, email) VALUES ('a', $1) RETURNING email",
            nfd("MÜLLER@example.com"),
        )
        assert stored == nfd("MÜLLER@example.com")
        with pytest.raises(UniqueViolationError):
            await conn.execute("INSERT INTO users (name, email) VALUES ('b', 'müller@example.com')")
        await conn.execute("UPDATE users SET email = $1", nfd("Zoë@example.com"))
        assert await conn.fetchval("SELECT email FROM users") == nfd("Zoë@example.com")


def interesting_code_points() -> list[str]:
    """Every code point that case folding or canonical decomposition changes, and Latin-1."""
    chars = []
    for cp in range(1, 0x110000):
        char = chr(cp)
        if 0xD800 <= cp < 0xE000 or unicodedata.category(char) == "Cn":
            continue
        if cp < 0x250 or char.casefold() != char or unicodedata.normalize("NFD", char) != char:
            chars.append(char)
    return chars


async def test_the_database_key_is_canonical_caseless_matching_for_every_code_point(
    db: Database,
) -> None:
    chars = interesting_code_points()
    words = [
        "".join(chars[i : i + 7]) for i in range(0, len(chars), 7)
    ]  # folds side by side, and combining marks after other letters
    samples = [*chars, *words, nfd("ǰΐ"), "ᾳ\u0345", "İstanbul", "ΌΣΟΣ"]
    async with db.connection() as conn:
        keys = await conn.fetchval(
            "SELECT array_agg(shop_email_key(s) ORDER BY i) FROM unnest($1::text[])"
            " WITH ORDINALITY AS t(s, i)",
            samples,
        )
    mismatches = [(s, k, reference_key(s)) for s, k in zip(samples, keys, strict=True)]
    mismatches = [m for m in mismatches if m[1] != m[2]]
    assert mismatches == [], mismatches[:20]


def test_the_migration_is_what_its_generator_writes() -> None:
    text = (files("pglayer_shop") / "migrations" / "0004_email_keys.sql").read_text("utf-8")
    version = re.search(r"Unicode (\d+\.\d+\.\d+)", text)
    assert version is not None
    # Under a newer Unicode, folding may have grown: the test above says if it matters.
    assert text == migration_sql(version.group(1)) or unicodedata.unidata_version != version[1]


@pytest.fixture
async def old_schema_url(server: Server, admin: asyncpg.Connection[Any]) -> AsyncIterator[str]:
    """A database at the schema before email keys, holding the users of an older release."""
    name = f"m_{uuid.uuid4().hex[:12]}"
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        async with Database(settings_for(server.url_for(name))) as db:
            await migrate(db, shop_migrations()[:BEFORE_KEYS])
        yield server.url_for(name)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def insert_users(db: Database, emails: list[str]) -> list[int]:
    async with db.connection() as conn:
        return [
            await conn.fetchval(
                "INSERT INTO users (name, email) VALUES ('old', $1) RETURNING id", email
            )
            for email in emails
        ]


async def test_the_migration_normalises_existing_emails_and_keys_them(old_schema_url: str) -> None:
    async with Database(settings_for(old_schema_url)) as db:
        ids = await insert_users(db, [nfd("zoë@example.com"), "Straße@example.com", "a@b.c"])
        applied = [n for n in await apply_migrations(db) if not n.startswith("pglayer/")]
        assert len(applied) == len(shop_migrations()) - BEFORE_KEYS
        async with db.connection() as conn:
            emails = await conn.fetch("SELECT id, email FROM users ORDER BY id")
            assert [(r["id"], r["email"]) for r in emails] == list(
                zip(ids, ["zoë@example.com", "Straße@example.com", "a@b.c"], strict=True)
            )
            for taken in ("ZOË@example.com", "strasse@EXAMPLE.com", "A@B.C"):
                with pytest.raises(UniqueViolationError):
                    await conn.execute("INSERT INTO users (name, email) VALUES ('n', $1)", taken)


async def test_the_migration_refuses_existing_emails_that_collide(old_schema_url: str) -> None:
    emails = ["straße@example.com", "a@example.com", "STRASSE@example.com", nfd("zoë@x.y")]
    emails.append("zoë@x.y")
    async with Database(settings_for(old_schema_url)) as db:
        ids = await insert_users(db, emails)
        with pytest.raises(MigrationError) as caught:
            await apply_migrations(db)
        message = str(caught.value)
        assert f"users {ids[0]}, {ids[2]}" in message
        assert f"users {ids[3]}, {ids[4]}" in message
        assert "straße" not in message.lower()  # ids only: no addresses in logs
        async with db.connection() as conn:  # nothing applied, nothing changed
            applied = await conn.fetchval(
                "SELECT count(*) FROM pglayer_migrations WHERE history = 'default'"
            )
            assert applied == BEFORE_KEYS
            rows = await conn.fetch("SELECT email FROM users ORDER BY id")
            assert [r["email"] for r in rows] == emails
