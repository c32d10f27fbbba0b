-- Orders' idempotency keys move to pglayer's own table (pglayer.IdempotencyKeys, scope
-- 'orders'), which stores the response itself; keys still within their window keep working.
-- Locked first: an order of an older shop still running could otherwise commit its key
-- after the copy read the table and before the DROP, and that key was lost (a resend then
-- placed a second order). Its later keyed orders fail instead, their keys unspent.
LOCK TABLE idempotency_keys IN ACCESS EXCLUSIVE MODE;
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
-- pglayer:replaces c424c0fa9579355242399f15ae0164aa455ec498f0839e4ab323cd7a1a55a9ef (2026-11-26 03:28, fff4f7b: the same copy, without the lock)
