-- Timestamps in JSON built by PostgreSQL, written as the API writes them everywhere else
-- ("2026-11-25T10:00:00.123456Z", fraction omitted when zero), so a client sees one format.
CREATE FUNCTION shop_json_time(ts timestamptz) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
RETURN regexp_replace(to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US'), '\.000000$', '')
       || 'Z';
