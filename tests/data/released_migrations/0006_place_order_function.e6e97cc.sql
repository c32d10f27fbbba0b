-- An order without an idempotency key is one call of this function in its own implicit
-- transaction: PostgreSQL releases the product's row lock as soon as it returns, instead
-- of after a round trip to the app for COMMIT. Under load that round trip waits for a
-- busy event loop, and every order on the same product queues behind it (measured: 660
-- orders/s on one product with COMMIT a round trip later, 150/s when the loop lags 4 ms).
-- Nothing changes before every check has passed, so a refused order commits nothing.
-- Locks are taken product first, then account, as every order does, so orders cannot
-- deadlock each other. `lock_timeout` (ms) is set first, for this transaction only; NULL
-- keeps the transaction's own (an order with a key runs inside the key's transaction).
CREATE FUNCTION shop_place_order(
    p_user bigint, p_product bigint, p_quantity integer, p_lock_ms integer
) RETURNS TABLE (
    stock_ok boolean, id bigint, user_id bigint, product_id bigint, quantity integer,
    unit_price numeric, total numeric, created_at timestamptz
)
LANGUAGE plpgsql AS $$
DECLARE
    v_price numeric;
BEGIN
    IF p_lock_ms IS NOT NULL THEN
        PERFORM set_config('lock_timeout', p_lock_ms::text, true);
    END IF;
    SELECT p.price INTO v_price FROM products AS p
     WHERE p.id = p_product AND p.stock >= p_quantity
       FOR UPDATE;
    stock_ok := FOUND;
    IF stock_ok THEN
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
