"""pglayer: a production async PostgreSQL layer for FastAPI, built on asyncpg."""

from pglayer.connection import Connection, Isolation
from pglayer.database import Database
from pglayer.dsn import describe_target, mask_dsn
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
    NotNullViolationError,
    PglayerError,
    PoolOverloadedError,
    PoolTimeoutError,
    ProgrammingError,
    QueryTimeoutError,
    SerializationError,
    TooManyConnectionsError,
    TransientError,
    UniqueViolationError,
)
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
    "ForeignKeyViolationError",
    "Histogram",
    "IntegrityError",
    "InvalidInputError",
    "Isolation",
    "NotNullViolationError",
    "PglayerError",
    "PoolOverloadedError",
    "PoolStats",
    "PoolTimeoutError",
    "ProgrammingError",
    "QueryTimeoutError",
    "SerializationError",
    "TooManyConnectionsError",
    "TransientError",
    "UniqueViolationError",
    "describe_target",
    "mask_dsn",
]
