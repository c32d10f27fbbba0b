"""Writes migration 0004_email_keys.sql: its case-folding tables come from `str.casefold`.

Run `python -m tests.email_key_sql > shop/src/pglayer_shop/migrations/0004_email_keys.sql` only
to create that file; a later Unicode version needs a new migration, never an edited one.
"""

from __future__ import annotations

import unicodedata


def _escaped(text: str) -> str:
    return "".join(f"\\{ord(c):04X}" if ord(c) < 0x10000 else f"\\+{ord(c):06X}" for c in text)


def _literal(chars: str, indent: str = "        ", width: int = 84) -> str:
    """`chars` as concatenated U&'' literals, lines of at most `width` escapes."""
    chunks = [""]
    for char in chars:
        if len(_escaped(chunks[-1] + char)) > width:
            chunks.append("")
        chunks[-1] += char
    return f"\n{indent}|| ".join(f"U&'{_escaped(c)}'" for c in chunks)


def migration_sql(unicode_version: str = unicodedata.unidata_version) -> str:
    """The migration's text, with this Python's case folding for non-ASCII characters."""
    one: list[tuple[str, str]] = []
    multi: list[tuple[str, str]] = []
    for cp in range(0x80, 0x110000):
        char = chr(cp)
        folded = char.casefold()
        if not 0xD800 <= cp < 0xE000 and folded != char:
            (one if len(folded) == 1 else multi).append((char, folded))
    src = "".join(c for c, _ in one)
    dst = "".join(f for _, f in one)
    mchars = "".join(c for c, _ in multi)
    rows = ",\n            ".join(f"[U&'{_escaped(c)}', U&'{_escaped(f)}']" for c, f in multi)
    lit = _literal
    return f"""-- Emails are unique after Unicode normalisation and case folding, whatever the
-- database's locale (under the C locale `lower()` folds only ASCII, so `lower(email)` let
-- `É` and `é` be two users). The key is Unicode canonical caseless matching (D145) as NFC:
-- NFC(casefold(NFD(email))), with full case folding (`ß` = `ss`, `ﬁ` = `fi`, final sigma =
-- sigma). The tables are Python's `str.casefold` (Unicode {unicode_version}), written by
-- tests/email_key_sql.py; tests/test_emails.py checks the function against Python for
-- every code point that case folding or NFD changes.
-- Needs a UTF8 database (`normalize`); a PostgreSQL upgrade that changes its Unicode
-- tables calls for `REINDEX INDEX users_email_key`, as with any collation change.
CREATE FUNCTION shop_email_key(email text) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $fn$
DECLARE
    folded text;
    pair text[];
BEGIN
    IF octet_length(email) = char_length(email) THEN  -- ASCII: folding is lower-casing
        RETURN translate(email, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz');
    END IF;
    -- One character to one ({len(one)} of them, ASCII aside), then one to several ({len(multi)}).
    -- After NFD most accented letters are ASCII letters and combining marks, so the big
    -- table is rarely needed: a (cached) regular expression looks first.
    folded := translate(
        normalize(email, NFD), 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz'
    );
    IF folded ~ (
        '['
        || {lit(src)}
        || ']'
    ) THEN
        folded := translate(
            folded,
            {lit(src, indent="            ")},
            {lit(dst, indent="            ")}
        );
    END IF;
    IF folded ~ (
        '['
        || {lit(mchars)}
        || ']'
    ) THEN
        FOREACH pair SLICE 1 IN ARRAY ARRAY[
            {rows}
        ] LOOP
            folded := replace(folded, pair[1], pair[2]);
        END LOOP;
    END IF;
    RETURN normalize(folded, NFC);
END
$fn$;

-- Rows that would share a key were distinct users so far: they are not merged or changed
-- here (orders and balances hang on them); the migration stops and names them instead.
DO $check$
DECLARE
    total bigint;
    listed text;
BEGIN
    SELECT count(*),
           string_agg(format('users %s', ids), '; ' ORDER BY first) FILTER (WHERE rank <= 20)
    INTO total, listed
    FROM (
        SELECT min(id) AS first, string_agg(id::text, ', ' ORDER BY id) AS ids,
               row_number() OVER (ORDER BY min(id)) AS rank
        FROM users
        GROUP BY shop_email_key(email)
        HAVING count(*) > 1
    ) AS clashes;
    IF total > 0 THEN
        RAISE EXCEPTION '% groups of users have emails equal after NFC normalisation and '
            'case folding: %', total, listed
            USING HINT = 'Change or merge these users (at most 20 groups listed), '
                'then migrate again.';
    END IF;
END
$check$;

DROP INDEX users_email_key;
UPDATE users SET email = normalize(email, NFC) WHERE email IS NOT NFC NORMALIZED;
CREATE UNIQUE INDEX users_email_key ON users (shop_email_key(email));

-- Stored NFC-normalised (case kept), whoever writes: the API, COPY, plain SQL.
CREATE FUNCTION shop_users_email_nfc() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    NEW.email := normalize(NEW.email, NFC);
    RETURN NEW;
END
$fn$;
CREATE TRIGGER users_email_nfc BEFORE INSERT OR UPDATE OF email ON users
FOR EACH ROW EXECUTE FUNCTION shop_users_email_nfc();\n"""


if __name__ == "__main__":
    print(migration_sql(), end="")
