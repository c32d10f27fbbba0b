"""`/products`: read one, list by id, create."""

from __future__ import annotations

from fastapi import Request, Response

from pglayer.fastapi import (
    After,
    Db,
    Limit,
    Page,
    Problem,
    json_response,
    problem_responses,
)
from pglayer_shop.models import Product, ProductCreate
from pglayer_shop.routes import router
from pglayer_shop.routes.cursors import cursors_of
from pglayer_shop.routes.params import ProductId, created

__all__: list[str] = []

_COLUMNS = "id, name, price, stock"
_GET = f"SELECT {_COLUMNS} FROM products WHERE id = $1"
_LIST = f"SELECT {_COLUMNS} FROM products WHERE id > $1 ORDER BY id LIMIT $2"


@router.get(
    "/products/{product_id}",
    tags=["products"],
    response_model=Product,
    responses=problem_responses(404, 422),
)
async def get_product(product_id: ProductId, db: Db) -> Response:
    row = await db.read(lambda conn: conn.fetchrow(_GET, product_id))
    if row is None:
        raise Problem(404, "not_found", f"Product {product_id} does not exist.")
    return json_response(row)


@router.get(
    "/products", tags=["products"], response_model=Page[Product], responses=problem_responses(422)
)
async def list_products(
    request: Request, db: Db, limit: Limit = 50, after: After = None
) -> Response:
    cursors = await cursors_of(request, db)
    return json_response(await cursors.page_by_id(db, _LIST, limit, after, of="products"))


@router.post(
    "/products",
    tags=["products"],
    status_code=201,
    response_model=Product,
    responses={**problem_responses(413, 422), **created()},
)
async def create_product(body: ProductCreate, db: Db) -> Response:
    # `db`, not a connection dependency: see `create_user`. One transaction, so it is replayed
    # only where it surely did not apply.
    insert = f"INSERT INTO products (name, price, stock) VALUES ($1, $2, $3) RETURNING {_COLUMNS}"
    row = await db.run_in_transaction(
        lambda conn: conn.fetchrow(insert, body.name, body.price, body.stock)
    )
    assert row is not None
    return json_response(row, status_code=201, headers={"Location": f"/products/{row['id']}"})
