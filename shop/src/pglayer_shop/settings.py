"""The shop's own settings (`PGLAYER_*`); the database's are `pglayer.DatabaseSettings`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["ShopSettings"]


class ShopSettings(BaseSettings):
    """The shop's settings, each read from `PGLAYER_<NAME>`."""

    model_config = SettingsConfigDict(
        env_prefix="PGLAYER_", extra="ignore", frozen=True, hide_input_in_errors=True
    )

    admin_token: SecretStr | None = Field(
        default=None,
        description="Bearer token of /admin/*; unset, those routes answer 404.",
    )
    cursor_secret: SecretStr | None = Field(
        default=None,
        description="Signs pagination cursors; every worker must share it. Unset: derived"
        " from DATABASE_URL.",
    )
    write_lock_timeout: float = Field(
        default=1.0,
        gt=0,
        description="How long orders, transfers and deposits wait for a row another request holds"
        " locked before 503 `busy` (well below the request deadline: a user is waiting).",
    )
    order_batch_size: int = Field(
        default=64,
        ge=1,
        le=1000,
        description="Most orders without an Idempotency-Key placed in one call while another"
        " call for the same product runs (one lock wait and one commit for all); 1 places"
        " each order alone.",
    )
    idempotency_key_ttl: float = Field(
        default=86_400.0,
        gt=0,
        description="How long an Idempotency-Key is kept (seconds); resent later, it makes a"
        " new order.",
    )
    idempotency_sweep_interval: float = Field(
        default=60.0, gt=0, description="How often expired keys are deleted, in small batches."
    )
    max_body_size: int = Field(
        default=1 << 20, gt=0, description="Request bodies above this many bytes get 413."
    )
    ready_timeout: float = Field(
        default=1.0, gt=0, description="/health/ready answers 503 when `SELECT 1` takes longer."
    )
    dashboard_strategy: Literal["single", "concurrent"] = Field(
        default="single",
        description="How /dashboard gathers its data: one SQL statement, or three queries side"
        " by side.",
    )
    log_format: Literal["text", "json"] | None = Field(
        default=None,
        description="Log format; unset leaves logging to the host (tests, an embedding app)."
        " `pglayer-shop serve` defaults to text.",
    )
    log_level: str = Field(default="INFO", description="The root log level.")
    access_log: bool = Field(
        default=False, description="One line per request on `pglayer.access` (serve: on)."
    )
    metrics: bool = Field(
        default=True,
        description="Prometheus HTTP metrics (pool metrics are read at scrape time and cost"
        " nothing).",
    )
    opentelemetry: bool = Field(
        default=False,
        description="FastAPI's own OpenTelemetry instrumentation. Off, pglayer's metrics and"
        " access log report the shop, and FastAPI skips looking up three OpenTelemetry"
        " providers (environment variables) on every request.",
    )
