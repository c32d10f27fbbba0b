-- A stored response is kept as the text it was first sent as (json, where jsonb reorders an
-- object's keys), so a replay is the same text. Keys live a day: the table rewrite is small.
ALTER TABLE pglayer_idempotency_keys ALTER COLUMN response TYPE json USING response::json;
