"""pglayer: a production async PostgreSQL layer for FastAPI, built on asyncpg."""

from pglayer import context
from pglayer.connection import Connection, Isolation, Record
from pglayer.context import current_operation, current_request_id, operation
from pglayer.database import Database
from pglayer.dsn import describe_target, mask_dsn, mask_text
from pglayer.errors import (
    CheckViolationError,
    CommitIndeterminateError,
    ConfigurationError,
    ConnectionLostError,
    DatabaseError,
    DatabaseUnavailableError,
    DeadlockError,
    ForeignKeyViolationError,
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
    TransientError,
    UniqueViolationError,
)
from pglayer.events import Event, Hook, PoolEvent, QueryEvent, RetryEvent, log_events
from pglayer.logs import configure_logging
from pglayer.settings import DatabaseSettings
from pglayer.stats import Histogram, PoolStats

__all__ = [
    "CheckViolationError",
    "CommitIndeterminateError",
    "ConfigurationError",
    "Connection",
    "ConnectionLostError",
    "Database",
    "DatabaseError",
    "DatabaseSettings",
    "DatabaseUnavailableError",
    "DeadlockError",
    "Event",
    "ForeignKeyViolationError",
    "Histogram",
    "Hook",
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
    "TooManyConnectionsError",
    "TransactionAbortedError",
    "TransientError",
    "UniqueViolationError",
    "configure_logging",
    "context",
    "current_operation",
    "current_request_id",
    "describe_target",
    "log_events",
    "mask_dsn",
    "mask_text",
    "operation",
]
