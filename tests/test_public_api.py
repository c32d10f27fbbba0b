"""The public API, pinned: what each public module exports, and that the rest is private.

As httpx's `test_exported_members`: a name added to or dropped from the API must show up
here, in review, never by accident.
"""

from __future__ import annotations

import importlib
import pathlib
import pkgutil
import re

import pytest

import pglayer

PUBLIC: dict[str, list[str]] = {
    "pglayer": [
        "BulkheadStats", "CheckViolationError", "CommitIndeterminateError",
        "ConfigurationError", "Connection", "ConnectionLostError", "Database", "DatabaseError",
        "DatabaseNotAnsweringError", "DatabaseSettings", "DatabaseUnavailableError",
        "DeadlockError", "EmbeddedPostgres",
        "Event", "ExternalPoolStats", "ForeignKeyViolationError", "Histogram", "Hook",
        "IdempotencyKeyReusedError", "IdempotencyKeys", "IntegrityError", "InvalidInputError",
        "Isolation", "LockTimeoutError", "NotNullViolationError", "PglayerError", "PoolEvent",
        "PoolOverloadedError", "PoolStats", "PoolTimeoutError", "ProgrammingError",
        "QueryEvent", "QueryTimeoutError", "Record", "RetryEvent", "SerializationError",
        "ServerSettings", "SlowQuery", "TooManyConnectionsError", "TransactionAbortedError",
        "TransactionEndedError", "TransientError", "UniqueViolationError", "body_hash",
        "configure_logging", "current_operation", "current_request_id", "deadline", "gather",
        "mask_dsn", "mask_text", "operation", "remaining", "serve", "set_retry_testing",
    ],
    "pglayer.fastapi": [
        "After", "Cursors", "Db", "DecimalInt", "Health", "IdempotencyKey", "Limit", "MAX_ID",
        "Page", "PathId", "Problem",
        "ProblemDetails", "ReadConnection", "Route", "WriteConnection", "WriteTransaction",
        "admin_guard", "admin_router", "field_error", "get_database", "health_router",
        "json_bytes", "json_response", "ndjson_response", "problem_response",
        "problem_responses", "setup", "setup_metrics", "transaction_dependency",
        "transactional", "with_database",
    ],
    "pglayer.migrations": [
        "DEFAULT_TIMEOUT", "Migration", "MigrationError", "install_pglayer_tables",
        "load_migrations", "migrate", "pending_migrations",
    ],
    "pglayer.sqlalchemy": [
        "count_engine", "create_engine", "session_transaction", "translate_sqlalchemy",
    ],
    "pglayer.fastapi.sqlalchemy": ["SqlSession", "setup_sqlalchemy"],
    "pglayer.testing": ["PgBouncer", "PoolMode", "database_url_for", "pgbouncer_binary"],
    "pglayer.uvicorn": ["HttpProtocol", "new_event_loop"],
}  # fmt: skip


@pytest.mark.parametrize("module_name", sorted(PUBLIC))
def test_each_public_module_exports_exactly_its_pinned_names(module_name: str) -> None:
    module = importlib.import_module(module_name)
    assert sorted(module.__all__) == sorted(PUBLIC[module_name])
    for name in module.__all__:
        assert getattr(module, name) is not None, name


def test_every_other_module_is_private() -> None:
    found = {
        info.name
        for info in pkgutil.walk_packages(pglayer.__path__, "pglayer.")
        if not info.name.rsplit(".", 1)[-1].startswith("_")
    }
    assert found == set(PUBLIC) - {"pglayer"}


@pytest.mark.parametrize("module_name", sorted(PUBLIC))
def test_every_public_callable_and_class_says_what_it_is(module_name: str) -> None:
    module = importlib.import_module(module_name)
    undocumented = [
        name
        for name in module.__all__
        if callable(obj := getattr(module, name))
        and isinstance(obj, type | type(len) | type(test_every_other_module_is_private))
        and obj.__module__.startswith("pglayer")  # not re-exported foreign types (Record)
        and not (obj.__doc__ or "").strip()
    ]
    assert undocumented == []


def test_the_shop_uses_only_the_public_api() -> None:
    shop = pathlib.Path(__file__).resolve().parent.parent / "shop" / "src"
    private = [
        f"{path.relative_to(shop)}: {line.strip()}"
        for path in shop.rglob("*.py")
        for line in path.read_text().splitlines()
        if re.search(r"\bpglayer(\.fastapi)?\._", line)
    ]
    assert private == []


def test_every_shop_setting_is_described() -> None:
    from pglayer_shop.settings import ShopSettings

    assert [n for n, f in ShopSettings.model_fields.items() if not f.description] == []


def test_public_errors_are_named_by_their_public_module() -> None:
    exported = {name: getattr(pglayer, name) for name in pglayer.__all__}
    errors = [
        n for n, obj in exported.items() if isinstance(obj, type) and issubclass(obj, Exception)
    ]
    assert len(errors) >= 10
    assert [n for n in errors if getattr(pglayer, n).__module__ != "pglayer"] == []
    with pytest.raises(pglayer.ConfigurationError) as refused:
        pglayer.Database(pglayer.DatabaseSettings(url=None))
    assert "pglayer.ConfigurationError" in repr(refused.type)
    assert "--factory" in str(refused.value)
