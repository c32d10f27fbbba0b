-- Stored replies of keyed orders, deposits and transfers written while pglayer kept them
-- as jsonb (until its migration 0002), and those 0005 copied: jsonb orders an object's keys
-- its own way, so a replay gave the same values in another order, not the bytes first
-- sent. Written again here in the order the API sends them; others are left as they are.
WITH shape (scope, fields) AS (
    VALUES ('orders', ARRAY['id', 'user_id', 'product_id', 'quantity', 'unit_price', 'total',
                            'created_at']),
           ('deposits', ARRAY['user_id', 'balance']),
           ('transfers', ARRAY['id', 'from_user_id', 'to_user_id', 'amount', 'created_at'])
), sent AS (
    SELECT k.scope, k.key,
           '{' || (SELECT string_agg(to_json(f)::text || ':' || (k.response::jsonb -> f)::text,
                                     ',' ORDER BY i)
                     FROM unnest(s.fields) WITH ORDINALITY AS u (f, i)) || '}' AS reply
      FROM pglayer_idempotency_keys AS k
      JOIN shape AS s ON s.scope = k.scope
     WHERE json_typeof(k.response) = 'object'
       AND (SELECT array_agg(f ORDER BY f) FROM json_object_keys(k.response) AS f)
           = (SELECT array_agg(f ORDER BY f) FROM unnest(s.fields) AS f)
)
UPDATE pglayer_idempotency_keys AS k
   SET response = sent.reply::json
  FROM sent
 WHERE k.scope = sent.scope AND k.key = sent.key AND k.response::text <> sent.reply;
