-- Orders' idempotency keys move to pglayer's own table (pglayer.IdempotencyKeys, scope
-- 'orders'), which stores the response itself; keys still within their window keep working.
INSERT INTO pglayer_idempotency_keys (scope, key, request_hash, response, created_at)
SELECT 'orders', k.key, k.request_hash,
       jsonb_build_object(
           'id', o.id, 'user_id', o.user_id, 'product_id', o.product_id,
           'quantity', o.quantity, 'unit_price', o.unit_price::text, 'total', o.total::text,
           -- As the API writes it ("…Z"), so a replay reads as the first answer did.
           'created_at', to_char(o.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
       ),
       k.created_at
  FROM idempotency_keys AS k
  JOIN orders AS o ON o.id = k.order_id
ON CONFLICT (scope, key) DO NOTHING;

DROP TABLE idempotency_keys;
