-- Orders placed together (`pglayer_shop.orders.OrderBatches`): one call, one lock wait and
-- one commit for many keyless orders of one product. Orders of one product otherwise queue
-- on its lock one after another, each holding it for its call and its commit, and under
-- load that queue, not the CPU, sets the pace (~1,200 orders/s with the CPU two-thirds busy
-- on the benchmark machine, fewer at 1,024 clients).
--
-- Every order call is this function now, one order being a batch of one: each order gets
-- its own outcome, in the order given, 'placed' (with the order row) or why not
-- ('no_user', 'no_product', 'stock', 'funds', in that order of precedence), decided in the
-- same call rather than by a second query; a refused order changes nothing. The product is
-- locked first, then the accounts in user_id order, as transfers lock them, so orders and
-- transfers cannot deadlock one another. `p_lock_ms` bounds the call's lock waits as
-- migration 0006 explains (NULL keeps the transaction's own: inside an idempotency key's
-- transaction).
CREATE FUNCTION shop_place_orders(
    p_users bigint[], p_quantities integer[], p_product bigint, p_lock_ms integer
) RETURNS TABLE (
    outcome text, id bigint, user_id bigint, product_id bigint, quantity integer,
    unit_price numeric, total numeric, created_at timestamptz
)
LANGUAGE plpgsql AS $$
DECLARE
    v_price numeric;
    v_stock integer;
    v_placed boolean := false;
    v_until timestamptz;
BEGIN
    IF p_lock_ms IS NOT NULL THEN
        v_until := clock_timestamp() + p_lock_ms * interval '1 millisecond';
        PERFORM set_config('lock_timeout', p_lock_ms::text, true);
        PERFORM pg_advisory_xact_lock(hashtext('shop_place_order'), (p_product % 2147483647)::int);
        PERFORM shop_lock_time_left(v_until);
    END IF;
    SELECT p.price, p.stock INTO v_price, v_stock FROM products AS p
     WHERE p.id = p_product
       FOR UPDATE;
    IF p_lock_ms IS NOT NULL THEN
        PERFORM shop_lock_time_left(v_until);
    END IF;
    PERFORM 1 FROM accounts AS a WHERE a.user_id = ANY (p_users) ORDER BY a.user_id FOR UPDATE;
    FOR i IN 1 .. cardinality(p_users) LOOP
        outcome := NULL;
        id := NULL; user_id := NULL; product_id := NULL; quantity := NULL;
        unit_price := NULL; total := NULL; created_at := NULL;
        IF v_stock >= p_quantities[i] THEN
            UPDATE accounts AS a
               SET balance = a.balance - v_price * p_quantities[i], updated_at = now()
             WHERE a.user_id = p_users[i] AND a.balance >= v_price * p_quantities[i];
            IF FOUND THEN
                v_stock := v_stock - p_quantities[i];
                v_placed := true;
                outcome := 'placed';
                INSERT INTO orders AS o (user_id, product_id, quantity, unit_price, total)
                VALUES (p_users[i], p_product, p_quantities[i], v_price, v_price * p_quantities[i])
                RETURNING o.id, o.user_id, o.product_id, o.quantity, o.unit_price, o.total,
                          o.created_at
                     INTO id, user_id, product_id, quantity, unit_price, total, created_at;
            END IF;
        END IF;
        IF outcome IS NULL THEN
            outcome := CASE
                WHEN NOT EXISTS (SELECT 1 FROM accounts AS a WHERE a.user_id = p_users[i])
                    THEN 'no_user'
                WHEN v_price IS NULL THEN 'no_product'
                WHEN v_stock < p_quantities[i] THEN 'stock'
                ELSE 'funds'
            END;
        END IF;
        RETURN NEXT;
    END LOOP;
    IF v_placed THEN
        UPDATE products AS p SET stock = v_stock WHERE p.id = p_product;
    END IF;
END;
$$;

DROP FUNCTION shop_place_order(bigint, bigint, integer, integer);
-- pglayer:replaces 9bc5a0683ffde8c36f0512953169b7b46fe2cb623548633c3ee0a50866302fe6 (2026-11-27 01:49, 6b50416: shop_place_order kept; 0009 drops it)
-- pglayer:replaces ea62da0a324bada3da6200530a7b943b48507499f088af8be61785c3813a92b4 (2026-11-27 02:03, 0823d86: an older shop_place_orders; 0009 replaces it)
-- pglayer:replaces f3c0e5f6572ad32267f4b6c077f2697cd70fb360f04260f8eaed34e460a3bf4c (2026-11-26 09:18, 3c9e164, as 0007_place_order_total_bound.sql: shop_place_order redefined; 0009 drops it)
