"""FastAPI integration: lifespan, dependencies, problem responses. The only FastAPI importer."""

from pglayer.fastapi.dependencies import (
    Db,
    DbConnection,
    ReadTransaction,
    ReplicaConnection,
    WriteTransaction,
    get_database,
    transaction_dependency,
)
from pglayer.fastapi.lifespan import database_lifespan, setup
from pglayer.fastapi.middleware import RequestGuard, current_request_id
from pglayer.fastapi.problems import (
    Problem,
    ProblemDetails,
    field_error,
    install_problem_handlers,
    problem_response,
    problem_responses,
)
from pglayer.fastapi.responses import json_bytes, json_response
from pglayer.fastapi.routing import Route, with_database

__all__ = [
    "Db",
    "DbConnection",
    "Problem",
    "ProblemDetails",
    "ReadTransaction",
    "ReplicaConnection",
    "RequestGuard",
    "Route",
    "WriteTransaction",
    "current_request_id",
    "database_lifespan",
    "field_error",
    "get_database",
    "install_problem_handlers",
    "json_bytes",
    "json_response",
    "problem_response",
    "problem_responses",
    "setup",
    "transaction_dependency",
    "with_database",
]
