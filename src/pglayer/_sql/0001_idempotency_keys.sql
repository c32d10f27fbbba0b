-- pglayer's own tables, kept in the `pglayer` migration history.
-- An idempotency key is written in the same transaction as the work it guards: it exists
-- (with the stored response) iff that work committed.
CREATE TABLE IF NOT EXISTS pglayer_idempotency_keys (
    scope        text NOT NULL,
    key          text NOT NULL CHECK (char_length(key) BETWEEN 1 AND 200),
    request_hash text NOT NULL,
    response     jsonb,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, key)
);
CREATE INDEX IF NOT EXISTS pglayer_idempotency_keys_created_idx
    ON pglayer_idempotency_keys (created_at);
