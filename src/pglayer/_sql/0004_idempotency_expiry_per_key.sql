-- Each key expires by the TTL of the `IdempotencyKeys` that claimed it. Expiry by the
-- sweeper's own TTL let one instance with a short TTL delete every other instance's keys
-- (the table is shared), and their work ran again when the key came back. Keys claimed
-- before this knew no TTL of their own: they get the default, a day.
ALTER TABLE pglayer_idempotency_keys ADD COLUMN IF NOT EXISTS expires_at timestamptz;
UPDATE pglayer_idempotency_keys SET expires_at = created_at + interval '1 day'
 WHERE expires_at IS NULL;
ALTER TABLE pglayer_idempotency_keys
    ALTER COLUMN expires_at SET DEFAULT now() + interval '1 day',
    ALTER COLUMN expires_at SET NOT NULL;
CREATE INDEX IF NOT EXISTS pglayer_idempotency_keys_expires_idx
    ON pglayer_idempotency_keys (expires_at);
DROP INDEX IF EXISTS pglayer_idempotency_keys_created_idx;
