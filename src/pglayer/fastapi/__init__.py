"""FastAPI integration: the only part of pglayer that imports FastAPI.

Lifespan and problem responses (`setup`), connections and transactions as dependencies,
transactional routes, pagination, streaming, idempotency keys, and the routes every app
needs (health, metrics, admin statistics).
"""

from typing import TYPE_CHECKING, Any

from pglayer.fastapi._admin import admin_guard, admin_router
from pglayer.fastapi._dependencies import (
    Db,
    ReadConnection,
    WriteConnection,
    WriteTransaction,
    get_database,
    transaction_dependency,
)
from pglayer.fastapi._health import Health, health_router
from pglayer.fastapi._idempotency import IdempotencyKey
from pglayer.fastapi._lifespan import setup
from pglayer.fastapi._pagination import After, Cursors, Limit, Page
from pglayer.fastapi._params import MAX_ID, DecimalInt, PathId
from pglayer.fastapi._problems import (
    Problem,
    ProblemDetails,
    field_error,
    problem_response,
    problem_responses,
)
from pglayer.fastapi._responses import json_bytes, json_response
from pglayer.fastapi._routing import Route, with_database
from pglayer.fastapi._streaming import ndjson_response
from pglayer.fastapi._transactional import transactional

if TYPE_CHECKING:
    from pglayer.fastapi._metrics import setup_metrics

__all__ = [
    "MAX_ID",
    "After",
    "Cursors",
    "Db",
    "DecimalInt",
    "Health",
    "IdempotencyKey",
    "Limit",
    "Page",
    "PathId",
    "Problem",
    "ProblemDetails",
    "ReadConnection",
    "Route",
    "WriteConnection",
    "WriteTransaction",
    "admin_guard",
    "admin_router",
    "field_error",
    "get_database",
    "health_router",
    "json_bytes",
    "json_response",
    "ndjson_response",
    "problem_response",
    "problem_responses",
    "setup",
    "setup_metrics",
    "transaction_dependency",
    "transactional",
    "with_database",
]


def __getattr__(name: str) -> Any:
    # Prometheus is an extra: imported only when metrics are asked for.
    if name == "setup_metrics":
        try:
            from pglayer.fastapi._metrics import setup_metrics
        except ImportError as exc:
            raise ImportError(
                "pglayer's metrics need prometheus-client: pip install 'pglayer[prometheus]'"
            ) from exc
        return setup_metrics
    raise AttributeError(f"module 'pglayer.fastapi' has no attribute {name!r}")
