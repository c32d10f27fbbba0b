"""pglayer: a production async PostgreSQL layer for FastAPI, built on asyncpg.

The public API is what this package, `pglayer.fastapi`, `pglayer.migrations`,
`pglayer.sqlalchemy` and `pglayer.testing` export; modules whose names start with `_` are
implementation (pinned by `tests/test_public_api.py`).
"""

from typing import TYPE_CHECKING, Any

from pglayer._concurrent import gather
from pglayer._connection import Connection, Isolation, Record
from pglayer._context import current_operation, current_request_id, operation
from pglayer._database import Database
from pglayer._deadline import deadline, remaining
from pglayer._dsn import mask_dsn, mask_text
from pglayer._errors import (
    CheckViolationError,
    CommitIndeterminateError,
    ConfigurationError,
    ConnectionLostError,
    DatabaseError,
    DatabaseNotAnsweringError,
    DatabaseUnavailableError,
    DeadlockError,
    ForeignKeyViolationError,
    IdempotencyKeyReusedError,
    IntegrityError,
    InvalidInputError,
    LockTimeoutError,
    NotNullViolationError,
    PglayerError,
    PoolOverloadedError,
    PoolTimeoutError,
    ProgrammingError,
    QueryTimeoutError,
    SerializationError,
    TooManyConnectionsError,
    TransactionAbortedError,
    TransactionEndedError,
    TransientError,
    UniqueViolationError,
)
from pglayer._idempotency import IdempotencyKeys, body_hash
from pglayer._logs import configure_logging
from pglayer._observability import (
    BulkheadStats,
    Event,
    ExternalPoolStats,
    Histogram,
    Hook,
    PoolEvent,
    PoolStats,
    QueryEvent,
    RetryEvent,
    SlowQuery,
)
from pglayer._retry import set_testing as set_retry_testing
from pglayer._serve import serve
from pglayer._settings import DatabaseSettings, ServerSettings

if TYPE_CHECKING:
    from pglayer._embedded import EmbeddedPostgres

__all__ = [
    "BulkheadStats",
    "CheckViolationError",
    "CommitIndeterminateError",
    "ConfigurationError",
    "Connection",
    "ConnectionLostError",
    "Database",
    "DatabaseError",
    "DatabaseNotAnsweringError",
    "DatabaseSettings",
    "DatabaseUnavailableError",
    "DeadlockError",
    "EmbeddedPostgres",
    "Event",
    "ExternalPoolStats",
    "ForeignKeyViolationError",
    "Histogram",
    "Hook",
    "IdempotencyKeyReusedError",
    "IdempotencyKeys",
    "IntegrityError",
    "InvalidInputError",
    "Isolation",
    "LockTimeoutError",
    "NotNullViolationError",
    "PglayerError",
    "PoolEvent",
    "PoolOverloadedError",
    "PoolStats",
    "PoolTimeoutError",
    "ProgrammingError",
    "QueryEvent",
    "QueryTimeoutError",
    "Record",
    "RetryEvent",
    "SerializationError",
    "ServerSettings",
    "SlowQuery",
    "TooManyConnectionsError",
    "TransactionAbortedError",
    "TransactionEndedError",
    "TransientError",
    "UniqueViolationError",
    "body_hash",
    "configure_logging",
    "current_operation",
    "current_request_id",
    "deadline",
    "gather",
    "mask_dsn",
    "mask_text",
    "operation",
    "remaining",
    "serve",
    "set_retry_testing",
]

# Tracebacks and reprs name the public class (`pglayer.ConfigurationError`), not the private
# module that defines it.
for _name in __all__:
    _error = globals().get(_name)
    if isinstance(_error, type) and issubclass(_error, Exception):
        _error.__module__ = __name__
del _name, _error


def __getattr__(name: str) -> Any:
    # The embedded launcher is for development and tests: imported only when asked for.
    if name == "EmbeddedPostgres":
        from pglayer._embedded import EmbeddedPostgres

        return EmbeddedPostgres
    raise AttributeError(f"module 'pglayer' has no attribute {name!r}")
