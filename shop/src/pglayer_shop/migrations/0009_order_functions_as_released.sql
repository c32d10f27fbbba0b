-- The order functions as 0006-0008 make them on a new database. A database that ran an
-- earlier text of 0006 or 0007 (the shop's versions of 2026-11-26 and -27 between those
-- files' first commit and their last, listed on their `pglayer:replaces` lines) has that
-- text's functions: without `shop_lock_time_left`, or with `shop_place_order` and
-- `shop_order_locks` beside an older `shop_place_orders`. On a new database this changes
-- nothing.
CREATE OR REPLACE FUNCTION shop_lock_time_left(until timestamptz) RETURNS void
LANGUAGE sql AS $$
SELECT set_config(
    'lock_timeout',
    greatest(1, ceil(extract(epoch FROM until - clock_timestamp()) * 1000))::bigint::text,
    true
)
$$;

CREATE OR REPLACE FUNCTION shop_place_orders(
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

DROP FUNCTION IF EXISTS shop_place_order(bigint, bigint, integer, integer);
DROP FUNCTION IF EXISTS shop_order_locks(bigint, integer);
