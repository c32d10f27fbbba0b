-- Each key expires by the TTL of the `IdempotencyKeys` that claimed it. Expiry by the
-- sweeper's own TTL let one instance with a short TTL delete every other instance's keys
-- (the table is shared), and their work ran again when the key came back. A key claimed
-- before this (or by an older release still running in a rolling deploy) has no
-- `expires_at`, and keeps the rule it was claimed under: the TTL of whoever looks at it.
ALTER TABLE pglayer_idempotency_keys ADD COLUMN IF NOT EXISTS expires_at timestamptz;
CREATE INDEX IF NOT EXISTS pglayer_idempotency_keys_expires_idx
    ON pglayer_idempotency_keys (expires_at);
-- pglayer:replaces ed70b2a7e49bbed630ad5c27ae968eb0c31438dcc3c82325fa19580722728bb8 (2026-11-28 06:50, a79d564: old keys got a day, expires_at NOT NULL; keys read the same)
