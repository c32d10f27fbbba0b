"""SQL shared by the benchmark's own apps (the floor and the bare FastAPI route).

The shop keeps its own copy: benchmark apps never import the shop.
"""

from __future__ import annotations

__all__ = ["DASHBOARD_JSON_SQL", "DASHBOARD_SQL", "USER_SQL"]

USER_SQL = "SELECT id, name, email, created_at FROM users WHERE id = $1"

# The shop's one-statement dashboard, with the rows as columns.
DASHBOARD_SQL = """
SELECT u.id, u.name, u.email, u.created_at, a.balance,
       coalesce((
           SELECT json_agg(json_build_object(
                      'id', o.id, 'user_id', o.user_id, 'product_id', o.product_id,
                      'quantity', o.quantity, 'unit_price', o.unit_price::text,
                      'total', o.total::text, 'created_at', o.created_at)
                  ORDER BY o.created_at DESC, o.id DESC)
           FROM (SELECT * FROM orders
                 WHERE user_id = u.id AND created_at > now() - interval '30 days'
                 ORDER BY created_at DESC, id DESC LIMIT 20) AS o
       ), '[]') AS recent_orders
FROM users AS u JOIN accounts AS a ON a.user_id = u.id
WHERE u.id = $1
"""

# The same answer built whole by PostgreSQL, passed through as bytes.
DASHBOARD_JSON_SQL = """
SELECT json_build_object(
    'user', json_build_object('id', u.id, 'name', u.name, 'email', u.email,
                              'created_at', u.created_at),
    'recent_orders', coalesce((
        SELECT json_agg(json_build_object(
                   'id', o.id, 'user_id', o.user_id, 'product_id', o.product_id,
                   'quantity', o.quantity, 'unit_price', o.unit_price::text,
                   'total', o.total::text, 'created_at', o.created_at)
               ORDER BY o.created_at DESC, o.id DESC)
        FROM (SELECT * FROM orders
              WHERE user_id = u.id AND created_at > now() - interval '30 days'
              ORDER BY created_at DESC, id DESC LIMIT 20) AS o
    ), '[]'),
    'balance', a.balance::text)::text
FROM users AS u JOIN accounts AS a ON a.user_id = u.id
WHERE u.id = $1
"""
