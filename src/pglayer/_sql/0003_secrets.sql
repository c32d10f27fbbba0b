-- Secrets every worker of an app must share (the key that signs pagination cursors), made
-- at random by the first process that asks and read by the others (`Cursors.from_database`).
CREATE TABLE IF NOT EXISTS pglayer_secrets (
    name       text PRIMARY KEY,
    value      bytea NOT NULL CHECK (octet_length(value) >= 32),
    created_at timestamptz NOT NULL DEFAULT now()
);
