"""The shop's HTTP routes: one router (one level of route matching), a module per resource.

The modules are imported here, in this order, so that the routes are matched hottest
first whoever imports what first.
"""

from fastapi import APIRouter

from pglayer.fastapi import Route

__all__ = ["router"]

router = APIRouter(route_class=Route)

from pglayer_shop.routes import (  # noqa: E402, F401  (they register on `router`)
    accounts,
    dashboard,
    health,
    orders,
    products,
    transfers,
    users,
)
