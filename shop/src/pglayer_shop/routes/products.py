"""`/products`: read one, list by id, create."""

from __future__ import annotations

from fastapi import Response

from pglayer.fastapi import Db, Problem, WriteConnection, json_response, problem_responses
from pglayer_shop.models import Page, Product, ProductCreate
from pglayer_shop.pagination import After, Limit, page_by_id
from pglayer_shop.routes import router
from pglayer_shop.routes.params import ProductId

__all__: list[str] = []

_COLUMNS = "id, name, price, stock"
_GET = f"SELECT {_COLUMNS} FROM products WHERE id = $1"


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
async def list_products(db: Db, limit: Limit = 50, after: After = None) -> Response:
    return json_response(await page_by_id(db, _COLUMNS, "products", limit, after))


@router.post(
    "/products",
    tags=["products"],
    status_code=201,
    response_model=Product,
    responses=problem_responses(413, 422),
)
async def create_product(body: ProductCreate, conn: WriteConnection) -> Response:
    row = await conn.fetchrow(
        f"INSERT INTO products (name, price, stock) VALUES ($1, $2, $3) RETURNING {_COLUMNS}",
        body.name,
        body.price,
        body.stock,
    )
    assert row is not None
    return json_response(row, status_code=201, headers={"Location": f"/products/{row['id']}"})
