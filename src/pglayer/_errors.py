"""Errors raised by pglayer, classified by SQLSTATE and never by message text.

    PglayerError
    ├── ConfigurationError                 bad settings, no URL
    ├── IdempotencyKeyReusedError          a key sent again with another body (422)
    └── DatabaseError                      .sqlstate .constraint .table; the cause as __cause__
        ├── TransientError                 retry later (503 + Retry-After)
        │   ├── ConnectionLostError        08*, 57P01, 57P02, 57P03, socket and protocol errors
        │   ├── TooManyConnectionsError    53300
        │   ├── SerializationError         40001
        │   │   └── DeadlockError          40P01
        │   ├── PoolTimeoutError           no connection within the acquire deadline
        │   ├── PoolOverloadedError        refused at once: would wait past its deadline
        │   ├── LockTimeoutError           55P03: a lock held past the lock bound (busy)
        │   ├── StatementsLostError        26000, 42P05 on the driver's own statements, in a
        │   │                              transaction (not exported: replayed, else 503)
        │   └── DatabaseUnavailableError   pool not open (yet) or closed; a connect refused
        ├── CommitIndeterminateError       lost after COMMIT was sent: outcome unknown (500)
        ├── IntegrityError
        │   ├── UniqueViolationError       23505 (409)
        │   ├── ForeignKeyViolationError   23503 (409)
        │   ├── CheckViolationError        23514 (422)
        │   └── NotNullViolationError      23502 (422)
        ├── InvalidInputError              22*, asyncpg's client-side DataError (422)
        ├── QueryTimeoutError              57014, client-side query deadline (504)
        │   └── DatabaseNotAnsweringError  the deadline, with the server silent (503)
        ├── TransactionAbortedError        COMMIT answered ROLLBACK: an error was swallowed
        ├── TransactionEndedError          the block's own COMMIT, ROLLBACK, or open BEGIN (500)
        └── ProgrammingError               42* (500)

`translate()` is the one place that turns asyncpg and socket errors into these.
"""

from __future__ import annotations

import socket
from typing import NoReturn

import asyncpg

# asyncpg raises this client-side class (not exported) for arguments it cannot encode,
# such as an int beyond int64; it is distinct from the server's 22000 `DataError`.
from asyncpg.exceptions._base import DataError as _ClientDataError

__all__ = [
    "CheckViolationError",
    "CommitIndeterminateError",
    "ConfigurationError",
    "ConnectionLostError",
    "DatabaseError",
    "DatabaseNotAnsweringError",
    "DatabaseUnavailableError",
    "DeadlockError",
    "ForeignKeyViolationError",
    "IdempotencyKeyReusedError",
    "IntegrityError",
    "InvalidInputError",
    "LockTimeoutError",
    "NotNullViolationError",
    "PglayerError",
    "PoolOverloadedError",
    "PoolTimeoutError",
    "ProgrammingError",
    "QueryTimeoutError",
    "SerializationError",
    "TooManyConnectionsError",
    "TransactionAbortedError",
    "TransactionEndedError",
    "TransientError",
    "UniqueViolationError",
    "explain_connect_error",
    "raise_translated",
    "refusal",
    "translate",
    "translate_connect",
]


class PglayerError(Exception):
    """Base of every error pglayer raises."""


class ConfigurationError(PglayerError):
    """The settings cannot work (no URL, impossible sizes)."""


class IdempotencyKeyReusedError(PglayerError):
    """An idempotency key was sent again with a different request body."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or "this idempotency key was used with a different request")


class DatabaseError(PglayerError):
    """An error from the database or the way to it."""

    default_message = "database error"

    def __init__(
        self,
        message: str | None = None,
        *,
        sqlstate: str | None = None,
        constraint: str | None = None,
        table: str | None = None,
        column: str | None = None,
    ) -> None:
        super().__init__(message or self.default_message)
        self.sqlstate = sqlstate
        self.constraint = constraint
        self.table = table
        self.column = column


class TransientError(DatabaseError):
    """Likely to succeed if tried again later."""

    default_message = "the database is temporarily unavailable"


class ConnectionLostError(TransientError):
    """The connection failed or was lost (08*, 57P01-3, socket and protocol errors)."""

    default_message = "the connection to the database failed or was lost"


class TooManyConnectionsError(TransientError):
    """The server has no free connection slots (53300)."""

    default_message = "the database has no free connection slots"


class SerializationError(TransientError):
    """The transaction conflicted with a concurrent one (40001); replaying may succeed."""

    default_message = "the transaction conflicted with a concurrent one"


class DeadlockError(SerializationError):
    """The transaction was chosen as a deadlock victim (40P01); replaying may succeed."""

    default_message = "the transaction was chosen as a deadlock victim"


class PoolTimeoutError(TransientError):
    """No pooled connection became free within the acquire deadline."""

    default_message = "no database connection became free within the acquire deadline"


class PoolOverloadedError(TransientError):
    """Refused without waiting: the predicted wait exceeds the deadline, or the wait bound.

    `retry_after` is the predicted wait in seconds, when there is one.
    """

    default_message = "the database is overloaded: a connection would not come in time"

    def __init__(self, message: str | None = None, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class LockTimeoutError(TransientError):
    """A row or table stayed locked past `lock_timeout` (55P03): busy, try again later."""

    default_message = "a lock was held by another transaction past the lock bound"


class StatementsLostError(TransientError):
    """Inside a transaction, the driver's prepared statements were gone from the server's
    session (`DEALLOCATE ALL`, or a pooler that hands out server connections per
    transaction): the transaction is aborted, and a replay prepares them again."""

    default_message = "the connection's prepared statements were lost inside a transaction"


class DatabaseUnavailableError(TransientError):
    """The pool is not open (yet) or was closed, or the server refused a new connection.

    `lasting` is true when the pool is not open and nothing is opening it: no retry is made.
    """

    default_message = "the database pool is not open"
    lasting = False


class CommitIndeterminateError(DatabaseError):
    """The connection died after COMMIT was sent: it may or may not have committed.

    Not transient: replaying could apply the work twice. Read the outcome back, or resend
    with the same idempotency key.
    """

    default_message = "the commit outcome is unknown: the connection was lost during COMMIT"


class IntegrityError(DatabaseError):
    """The change violates a constraint (23*)."""

    default_message = "the change violates a constraint"


class UniqueViolationError(IntegrityError):
    """A row with the same unique values exists (23505)."""

    default_message = "a row with the same unique values already exists"


class ForeignKeyViolationError(IntegrityError):
    """A referenced row is missing, or a row is still referenced (23503)."""

    default_message = "a referenced row does not exist or is still referenced"


class CheckViolationError(IntegrityError):
    """A value violates a check constraint (23514)."""

    default_message = "a value violates a check constraint"


class NotNullViolationError(IntegrityError):
    """A required value is missing (23502)."""

    default_message = "a required value is missing"


class InvalidInputError(DatabaseError):
    """A value is not valid for its column type (22*, or refused by the driver)."""

    default_message = "a value is not valid for its column type"


class QueryTimeoutError(DatabaseError):
    """A statement did not finish within its deadline (57014, or client-side)."""

    default_message = "the query did not finish within its deadline"


class DatabaseNotAnsweringError(QueryTimeoutError):
    """A statement's client-side deadline passed, past the server's own `statement_timeout`,
    and the server answered nothing on any connection of its pool meanwhile: it is stopped
    or cut off (frozen, a network partition), not slow."""

    default_message = "the database answered nothing on any connection within the deadline"


class TransactionAbortedError(DatabaseError):
    """COMMIT found the transaction failed (an error inside was caught and ignored), so
    PostgreSQL rolled it back: nothing was applied."""

    default_message = "the transaction had failed and was rolled back at COMMIT"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message, sqlstate="25P02")


class TransactionEndedError(DatabaseError):
    """A block managed a transaction itself against pglayer: inside pglayer's, a COMMIT or
    ROLLBACK ended it (what came before it was applied or undone, what came after ran in
    autocommit); or, lent a connection without one, it began its own and left it open (rolled
    back)."""

    default_message = (
        "the transaction was ended inside its block by a COMMIT or ROLLBACK statement; "
        "let the block commit (or raise to roll back), or use a plain connection"
    )


class ProgrammingError(DatabaseError):
    """The statement is invalid for this schema (42*): a bug, not bad input."""

    default_message = "the statement is invalid for this schema"


_EXACT: dict[str, type[DatabaseError]] = {
    "23505": UniqueViolationError,
    "23503": ForeignKeyViolationError,
    "23514": CheckViolationError,
    "23502": NotNullViolationError,
    "40001": SerializationError,
    "40P01": DeadlockError,
    "53300": TooManyConnectionsError,
    "57P01": ConnectionLostError,  # admin_shutdown
    "57P02": ConnectionLostError,  # crash_shutdown
    "57P03": ConnectionLostError,  # cannot_connect_now
    "57014": QueryTimeoutError,  # query_canceled (statement_timeout)
    "55P03": LockTimeoutError,  # lock_not_available (lock_timeout, NOWAIT)
}
_BY_CLASS: dict[str, type[DatabaseError]] = {
    "08": ConnectionLostError,
    "22": InvalidInputError,
    "23": IntegrityError,
    "42": ProgrammingError,
}


def class_for_sqlstate(sqlstate: str | None) -> type[DatabaseError]:
    """The pglayer error class for a five-character SQLSTATE."""
    if not sqlstate:
        return DatabaseError
    exact = _EXACT.get(sqlstate)
    if exact is not None:
        return exact
    return _BY_CLASS.get(sqlstate[:2], DatabaseError)


def raise_translated(exc: BaseException, translated: BaseException) -> NoReturn:
    """Raise `translated` from `exc`, or `exc` unchanged when translation kept it.

    The one way a foreign error leaves pglayer: the original stays as `__cause__`.
    """
    if translated is exc:
        raise exc
    raise translated from exc


# Messages for codes whose class says too little to act on.
_MESSAGES = {
    "25006": "a write in a read-only transaction: on a replica, or through db.read,"
    " read_connection or ReadConnection (PGLAYER_READS_READ_ONLY)",
}


# What PostgreSQL says with 53300, and PgBouncer of its own limits: a pooler passes them on
# as 08P01, in words only.
_LIMITS_SAID = (
    "too many connections for",
    "too many clients",
    "remaining connection slots are reserved",
    "max_client_conn",
    "max_user_connections",
    "max_db_connections",
)


def _limit_said_by_pooler(exc: BaseException) -> bool:
    return isinstance(exc, asyncpg.ProtocolViolationError) and any(
        said in str(exc) for said in _LIMITS_SAID
    )


def translate(exc: BaseException, *, connection_closed: bool = False) -> BaseException:
    """Map a driver or socket error to a pglayer error; anything else is returned as is.

    `connection_closed` tells whether the connection used was closed afterwards: asyncpg
    reports use of a connection closed under it as a plain InterfaceError.
    The caller raises the result `from exc`, so the original stays as `__cause__`.
    """
    if isinstance(exc, PglayerError):
        return exc
    if _limit_said_by_pooler(exc):
        return TooManyConnectionsError(TooManyConnectionsError.default_message, sqlstate="53300")
    if isinstance(exc, asyncpg.PostgresError):
        # asyncpg wraps the server's reason for closing (57P01, 57P02) in a 08003 error.
        if isinstance(exc, asyncpg.ConnectionDoesNotExistError) and isinstance(
            exc.__cause__, asyncpg.PostgresError
        ):
            exc = exc.__cause__
        cls = class_for_sqlstate(exc.sqlstate)
        return cls(
            _MESSAGES.get(exc.sqlstate, cls.default_message),
            sqlstate=exc.sqlstate,
            constraint=getattr(exc, "constraint_name", None),
            table=getattr(exc, "table_name", None),
            column=getattr(exc, "column_name", None),
        )
    if isinstance(exc, _ClientDataError | OverflowError):  # COPY's encoder: OverflowError
        return InvalidInputError(InvalidInputError.default_message)
    # TimeoutError is an OSError subclass, so it must be tested first.
    if isinstance(exc, TimeoutError):
        return QueryTimeoutError(QueryTimeoutError.default_message)
    if isinstance(exc, OSError | asyncpg.exceptions.ConnectionDoesNotExistError):
        return ConnectionLostError(ConnectionLostError.default_message, sqlstate="08006")
    if isinstance(exc, asyncpg.InternalClientError):
        # The protocol is in a state it cannot leave (the server dropped the connection while
        # idle, e.g. at shutdown); raised before anything is sent, and the connection is dead.
        return ConnectionLostError(ConnectionLostError.default_message, sqlstate="08006")
    if isinstance(exc, asyncpg.InterfaceError) and connection_closed:
        return ConnectionLostError(ConnectionLostError.default_message, sqlstate="08003")
    return exc


def refusal(error: DatabaseError | None) -> str | None:
    """The SQLSTATE of the server's own refusal of a connect (53300, 3D000, 28P01, 55000,
    57P03...), or None: no error, or a socket failure (the client's 08006)."""
    sqlstate = error.sqlstate if error is not None else None
    return sqlstate if sqlstate and not sqlstate.startswith("08") else None


def translate_connect(exc: BaseException) -> BaseException:
    """`translate()` for a failed connect: no connection was lost, and a refusal (a database
    renamed or closed to connections, a role that may not log in) leaves the app without its
    database, which is an outage to its clients (503), not a bug; 53300 stays as it is."""
    error = translate(exc)
    if isinstance(error, ConnectionLostError) or (
        isinstance(error, DatabaseError) and not isinstance(error, TransientError)
    ):
        return DatabaseUnavailableError(
            f"cannot connect ({type(exc).__name__})", sqlstate=error.sqlstate
        )
    return error


def explain_connect_error(exc: BaseException, target: str) -> str:
    """Why a connection attempt failed, in words an operator can act on (no secrets)."""
    if isinstance(exc, socket.gaierror):
        return f"the host name of {target} does not resolve"
    if isinstance(exc, ConnectionRefusedError):
        return f"nothing is listening at {target} (connection refused): is the server running?"
    if isinstance(exc, TimeoutError):
        return (
            f"{target} did not answer in time (a firewall, the server overloaded, or a"
            " pooler waiting for a server it cannot reach or log in to: after a failed login"
            " PgBouncer holds its clients for server_login_retry, and its log says why)"
        )
    if isinstance(
        exc, asyncpg.InvalidPasswordError | asyncpg.InvalidAuthorizationSpecificationError
    ):
        return f"{target} rejected the user or password"
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return f"the database of {target} does not exist"
    if isinstance(exc, asyncpg.TooManyConnectionsError):
        return (
            f"{target} refused another connection (53300): max_connections is reached, or the"
            " CONNECTION LIMIT of the role or the database"
        )
    if isinstance(exc, asyncpg.CannotConnectNowError):
        return f"{target} is starting up, shutting down or in recovery"
    if isinstance(exc, ConnectionError) and "SSL" in str(exc):
        # Also what asyncpg says when something other than PostgreSQL answers (its default
        # sslmode asks for SSL first, and takes only PostgreSQL's yes or no).
        return (
            f"{target} did not answer as PostgreSQL does (is it a PostgreSQL server at that"
            " port?), or does not speak SSL, which the URL's sslmode requires"
        )
    if isinstance(exc, OSError):
        return f"cannot reach {target}: {exc.strerror or type(exc).__name__}"
    if isinstance(exc, asyncpg.UndefinedObjectError):
        # The server's words name the parameter (a URL query parameter it does not know).
        return f"{target} refused a parameter of the URL: {exc.args[0] if exc.args else exc}"
    # PgBouncer says what PostgreSQL says with 28P01 or 3D000 with 08P01, in words.
    if isinstance(exc, asyncpg.ProtocolViolationError) and "authentication failed" in str(exc):
        return f"{target} rejected the user or password (the pooler's check)"
    said = str(exc)[:200]  # the pooler's words: they name the role or database it means
    if _limit_said_by_pooler(exc):
        return (
            f"the pooler at {target}, or the server behind it, refused another connection"
            f" ({said}): max_connections is reached, or a CONNECTION LIMIT of the role or the"
            " database, or the pooler's own limits (max_client_conn, max_db_connections)"
        )
    if isinstance(exc, asyncpg.ProtocolViolationError) and 'role "' in said:
        return f"a role does not exist (for the pooler at {target} or behind it): {said}"
    if isinstance(exc, asyncpg.ProtocolViolationError) and (
        "no such database" in said or "does not exist" in said
    ):
        return f"the database of {target} does not exist (for the pooler or behind it): {said}"
    if isinstance(exc, asyncpg.ProtocolViolationError) and "startup parameter" in said:
        return (
            f"the pooler at {target} refused a startup parameter ({said}): it forwards only a"
            " few (application_name); take the others out of the URL and set them on the role"
        )
    if isinstance(exc, asyncpg.PostgresError):  # the server's words say what to mend
        return f"{target} refused the connection: {said} (SQLSTATE {exc.sqlstate})"
    return f"cannot connect to {target} ({type(exc).__name__})"
