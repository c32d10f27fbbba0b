"""`/products`: read one, list by id, create."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response

from pglayer.fastapi import Db, DbConnection, Problem, problem_responses
from pglayer_shop.models import MAX_ID, Page, Product, ProductCreate
from pglayer_shop.pagination import After, Limit, page_by_id

__all__ = ["router"]

router = APIRouter(tags=["products"])

ProductId = Annotated[int, Path(gt=0, le=MAX_ID, description="A positive 64-bit id")]
_COLUMNS = "id, name, price, stock"


@router.get("/products/{product_id}", responses=problem_responses(404, 422))
async def get_product(product_id: ProductId, db: Db) -> Product:
    product = await db.read(
        lambda conn: conn.fetch_one(
            Product, f"SELECT {_COLUMNS} FROM products WHERE id = $1", product_id
        )
    )
    if product is None:
        raise Problem(404, "not_found", f"Product {product_id} does not exist.")
    return product


@router.get("/products", responses=problem_responses(422))
async def list_products(db: Db, limit: Limit = 50, after: After = None) -> Page[Product]:
    return await page_by_id(db, Product, _COLUMNS, "products", limit, after)


@router.post("/products", status_code=201, responses=problem_responses(413, 422))
async def create_product(body: ProductCreate, conn: DbConnection, response: Response) -> Product:
    product = await conn.fetch_one(
        Product,
        f"INSERT INTO products (name, price, stock) VALUES ($1, $2, $3) RETURNING {_COLUMNS}",
        body.name,
        body.price,
        body.stock,
    )
    assert product is not None
    response.headers["Location"] = f"/products/{product.id}"
    return product
