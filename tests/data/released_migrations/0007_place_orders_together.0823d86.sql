-- Keyless orders of one product placed together (`pglayer_shop.orders.OrderBatches`): one
-- call, one lock wait and one commit for many. Orders of one product otherwise queue on its
-- lock one after another, each holding it for its call and its commit, and under load that
-- queue, not the CPU, sets the pace (~1,200 orders/s with the CPU two-thirds busy on the
-- benchmark machine, fewer at 1,024 clients).
--
-- Every order gets its own outcome, in the order given: 'placed' (with the order row), or
-- why not, as `shop_place_order` and its explanation decide it ('no_user', 'no_product',
-- 'stock', 'funds'); a refused order changes nothing. The product is locked first, then
-- the accounts in user_id order, as transfers lock them, so batches, single orders and
-- transfers cannot deadlock one another. `p_lock_ms` as in `shop_place_order`, which now
-- takes its locks the same way (`shop_order_locks`).

-- The first locks of every order call: with a bound (`p_lock_ms`; NULL keeps the
-- transaction's own), `lock_timeout` for the call, the product's advisory lock (one wait,
-- see migration 0006), then the product's row with what is left of the bound. Returns when
-- the bound ends (NULL without one), the product's price and stock (NULL if it does not
-- exist).
CREATE FUNCTION shop_order_locks(
    p_product bigint, p_lock_ms integer, OUT until timestamptz, OUT price numeric,
    OUT stock integer
)
LANGUAGE plpgsql AS $$
BEGIN
    IF p_lock_ms IS NOT NULL THEN
        until := clock_timestamp() + p_lock_ms * interval '1 millisecond';
        PERFORM set_config('lock_timeout', p_lock_ms::text, true);
        PERFORM pg_advisory_xact_lock(hashtext('shop_place_order'), (p_product % 2147483647)::int);
        PERFORM shop_lock_time_left(until);
    END IF;
    SELECT p.price, p.stock INTO price, stock FROM products AS p
     WHERE p.id = p_product
       FOR UPDATE;
    IF p_lock_ms IS NOT NULL THEN
        PERFORM shop_lock_time_left(until);
    END IF;
END;
$$;

CREATE OR REPLACE FUNCTION shop_place_order(
    p_user bigint, p_product bigint, p_quantity integer, p_lock_ms integer
) RETURNS TABLE (
    stock_ok boolean, id bigint, user_id bigint, product_id bigint, quantity integer,
    unit_price numeric, total numeric, created_at timestamptz
)
LANGUAGE plpgsql AS $$
DECLARE
    v_locked record;
BEGIN
    v_locked := shop_order_locks(p_product, p_lock_ms);
    stock_ok := v_locked.stock >= p_quantity;
    IF stock_ok THEN
        UPDATE accounts AS a
           SET balance = a.balance - v_locked.price * p_quantity, updated_at = now()
         WHERE a.user_id = p_user AND a.balance >= v_locked.price * p_quantity;
        IF FOUND THEN
            UPDATE products AS p SET stock = p.stock - p_quantity WHERE p.id = p_product;
            INSERT INTO orders AS o (user_id, product_id, quantity, unit_price, total)
            VALUES (p_user, p_product, p_quantity, v_locked.price, v_locked.price * p_quantity)
            RETURNING o.id, o.user_id, o.product_id, o.quantity, o.unit_price, o.total,
                      o.created_at
                 INTO id, user_id, product_id, quantity, unit_price, total, created_at;
        END IF;
    END IF;
    RETURN NEXT;
END;
$$;

CREATE FUNCTION shop_place_orders(
    p_users bigint[], p_quantities integer[], p_product bigint, p_lock_ms integer
) RETURNS TABLE (
    outcome text, id bigint, user_id bigint, product_id bigint, quantity integer,
    unit_price numeric, total numeric, created_at timestamptz
)
LANGUAGE plpgsql AS $$
DECLARE
    v_locked record;
    v_price numeric;
    v_stock integer;
    v_placed boolean := false;
BEGIN
    v_locked := shop_order_locks(p_product, p_lock_ms);
    v_price := v_locked.price;
    v_stock := v_locked.stock;
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
