-- `lock_timeout` bounds each wait for a lock, not their sum, and a row lock with a queue of
-- waiters is two waits (the tuple lock, behind the waiters ahead, then the holder's
-- transaction): with 0006 an order on a contended row could wait twice its bound (measured:
-- 2.03 s with a 1 s bound). Now, with a bound, orders of one product queue on one advisory
-- lock (a single wait), and each later lock wait gets only what is left of the bound, so the
-- call ends within it. Without a bound (inside a transaction) nothing changes.
CREATE OR REPLACE FUNCTION shop_place_order(
    p_user bigint, p_product bigint, p_quantity integer, p_lock_ms integer
) RETURNS TABLE (
    stock_ok boolean, id bigint, user_id bigint, product_id bigint, quantity integer,
    unit_price numeric, total numeric, created_at timestamptz
)
LANGUAGE plpgsql AS $$
DECLARE
    v_price numeric;
    v_until timestamptz;
BEGIN
    IF p_lock_ms IS NOT NULL THEN
        v_until := clock_timestamp() + p_lock_ms * interval '1 millisecond';
        PERFORM set_config('lock_timeout', p_lock_ms::text, true);
        PERFORM pg_advisory_xact_lock(hashtext('shop_place_order'), (p_product % 2147483647)::int);
        PERFORM shop_lock_time_left(v_until);
    END IF;
    SELECT p.price INTO v_price FROM products AS p
     WHERE p.id = p_product AND p.stock >= p_quantity
       FOR UPDATE;
    stock_ok := FOUND;
    IF stock_ok THEN
        IF p_lock_ms IS NOT NULL THEN
            PERFORM shop_lock_time_left(v_until);
        END IF;
        UPDATE accounts AS a SET balance = a.balance - v_price * p_quantity, updated_at = now()
         WHERE a.user_id = p_user AND a.balance >= v_price * p_quantity;
        IF FOUND THEN
            UPDATE products AS p SET stock = p.stock - p_quantity WHERE p.id = p_product;
            INSERT INTO orders AS o (user_id, product_id, quantity, unit_price, total)
            VALUES (p_user, p_product, p_quantity, v_price, v_price * p_quantity)
            RETURNING o.id, o.user_id, o.product_id, o.quantity, o.unit_price, o.total,
                      o.created_at
                 INTO id, user_id, product_id, quantity, unit_price, total, created_at;
        END IF;
    END IF;
    RETURN NEXT;
END;
$$;

-- `lock_timeout` for the rest of this transaction: what is left until `until` (at least 1 ms,
-- so a bound already spent fails the next wait at once).
CREATE FUNCTION shop_lock_time_left(until timestamptz) RETURNS void
LANGUAGE sql AS $$
SELECT set_config(
    'lock_timeout',
    greatest(1, ceil(extract(epoch FROM until - clock_timestamp()) * 1000))::bigint::text,
    true
)
$$;
