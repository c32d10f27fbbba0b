"""Settings read from `DATABASE_URL` and `PGLAYER_*` environment variables."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["DatabaseSettings", "ServerSettings"]


class DatabaseSettings(BaseSettings):
    """Pool, timeout and connection settings; every duration is in seconds."""

    model_config = SettingsConfigDict(
        env_prefix="PGLAYER_", extra="ignore", frozen=True, populate_by_name=True
    )

    url: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("url", "DATABASE_URL", "PGLAYER_DATABASE_URL")
    )
    min_size: int = Field(default=2, ge=0)
    max_size: int = Field(default=10, ge=1)
    # A hard cap on queued acquirers (memory); below it, a newcomer is refused at once only
    # when its predicted wait exceeds its deadline (see the README, "Overload").
    max_waiters: int = Field(default=2048, ge=0)
    # Bulkheads: the most connections each kind of work may hold at once, as JSON
    # (`{"write": 6, "reports": 2}`). Unnamed work is `read` or `write`; by default writes may
    # hold all but a quarter of the pool, so reads keep some however writes are stuck.
    bulkheads: dict[str, int] = Field(default_factory=dict)
    # A refusal (503 `overloaded`) is answered after this pause, which slows clients that
    # retry at once without costing the server anything.
    refusal_delay: float = Field(default=0.025, ge=0, le=1.0)
    acquire_timeout: float = Field(default=2.0, gt=0)
    connect_timeout: float = Field(default=5.0, gt=0)
    # Client-side deadline for one query; the server-side `statement_timeout` fires first.
    query_timeout: float = Field(default=15.0, gt=0)
    statement_timeout: float = Field(default=10.0, ge=0)
    lock_timeout: float = Field(default=5.0, ge=0)
    idle_in_transaction_timeout: float = Field(default=30.0, ge=0)
    # PostgreSQL 14+: how often a busy backend checks that its client is still there, so a
    # query whose connection was cut (pool terminated, client gone) stops on the server too.
    client_connection_check_interval: float = Field(default=1.0, ge=0)
    # How long `open()` keeps retrying an unreachable server before it gives up.
    startup_timeout: float = Field(default=30.0, ge=0)
    # When false, an app starts while the database is down and becomes ready by itself.
    require_on_startup: bool = False
    close_timeout: float = Field(default=10.0, ge=0)
    # Retries of transient failures (reads, whole transactions): attempts include the first.
    retry_attempts: int = Field(default=3, ge=1)
    retry_initial_wait: float = Field(default=0.05, ge=0)
    retry_max_wait: float = Field(default=1.0, ge=0)
    max_inactive_connection_lifetime: float = Field(default=300.0, ge=0)
    statement_cache_size: int = Field(default=1024, ge=0)
    # Statements slower than this are logged (SQL text only, no parameters); 0 turns it off.
    slow_query_threshold: float = Field(default=0.5, ge=0)
    application_name: str = "pglayer"
    # The connection budget checked at open(): `workers` processes each with up to
    # `max_size` connections, plus `connection_reserve` for admins, migrations and cron.
    workers: int = Field(
        default=1,
        ge=1,
        validation_alias=AliasChoices("workers", "PGLAYER_WORKERS", "WEB_CONCURRENCY"),
    )
    connection_reserve: int = Field(default=5, ge=0)
    on_budget_exceeded: Literal["warn", "refuse", "ignore"] = "warn"
    # What sits between pglayer and PostgreSQL. `auto` looks at open(): a server port that
    # differs from the URL's means a pooler, then its mode and whether prepared statements
    # survive it are probed. Transaction pooling turns the statement cache off (unless
    # PgBouncer >= 1.21 keeps statements) and sends no timeouts as startup parameters.
    pooler: Literal["auto", "none", "pgbouncer-transaction", "pgbouncer-session"] = "auto"
    # Read replicas (comma-separated URLs). Reads that ask for one go to a healthy replica,
    # round-robin; a replica more than `replica_max_lag` seconds behind, unreachable, or
    # not in recovery is skipped, and with none left reads go to the primary.
    replica_urls: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    replica_max_lag: float = Field(default=5.0, ge=0)
    replica_check_interval: float = Field(default=1.0, gt=0)
    # After a write, the same client reads from the primary for this long (a cookie).
    read_your_writes_window: float = Field(default=5.0, ge=0)

    @field_validator("replica_urls", mode="before")
    @classmethod
    def _split_urls(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _check_sizes(self) -> DatabaseSettings:
        if self.min_size > self.max_size:
            raise ValueError("min_size must not exceed max_size")
        if any(cap < 1 for cap in self.bulkheads.values()):
            raise ValueError("every bulkhead needs at least one connection")
        return self

    def bulkhead_caps(self) -> dict[str, int]:
        """Each bulkhead's cap: the configured ones over the defaults."""
        reserved_for_reads = max(1, self.max_size // 4) if self.max_size > 1 else 0
        defaults = {"read": self.max_size, "write": self.max_size - reserved_for_reads}
        return {**defaults, **self.bulkheads}

    def server_settings(self) -> dict[str, str]:
        """Startup parameters for every connection (not `SET`: PgBouncer-safe)."""

        def ms(seconds: float) -> str:
            return str(int(seconds * 1000))

        return {
            "application_name": self.application_name,
            "statement_timeout": ms(self.statement_timeout),
            "lock_timeout": ms(self.lock_timeout),
            "idle_in_transaction_session_timeout": ms(self.idle_in_transaction_timeout),
            "client_connection_check_interval": ms(self.client_connection_check_interval),
        }

    def for_replica(self, url: SecretStr) -> DatabaseSettings:
        """These settings for one replica: its URL, no replicas of its own."""
        return self.model_copy(update={"url": url, "replica_urls": []})

    def dsn(self) -> str:
        """The connection string; raises if none is configured."""
        if self.url is None:
            raise ValueError("no database URL: set DATABASE_URL")
        return self.url.get_secret_value()


class ServerSettings(BaseSettings):
    """Bounds the HTTP server of `pglayer serve` puts on every request (`pglayer._http`)."""

    model_config = SettingsConfigDict(env_prefix="PGLAYER_", extra="ignore", frozen=True)

    max_header_size: int = Field(
        default=65536,
        ge=1024,
        description="Most bytes a request line and its headers may take; a larger head "
        "gets 431 and the connection is closed.",
    )
    header_timeout: float = Field(
        default=10.0,
        gt=0,
        description="Seconds a request line and its headers may take to arrive, from the "
        "connection's start (or the request's first byte on a kept-alive connection); "
        "later gets 408 and the connection is closed.",
    )
    body_timeout: float = Field(
        default=30.0,
        gt=0,
        description="Seconds a request body may take to arrive after its headers; later "
        "gets 408 and the connection is closed.",
    )
