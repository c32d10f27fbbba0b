"""The shop's settings (`PGLAYER_*`): pglayer's `ServerSettings` and the shop's own; the
database's are `pglayer.DatabaseSettings`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr

from pglayer import ServerSettings

__all__ = ["ShopSettings"]


class ShopSettings(ServerSettings):
    """The shop's settings, each read from `PGLAYER_<NAME>`: the server's, and these."""

    cursor_secret: SecretStr | None = Field(
        default=None,
        description="Signs pagination cursors; every worker must share it. Unset: a random"
        " secret made once and kept in the database (`pglayer_secrets`).",
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
    dashboard_strategy: Literal["single", "concurrent"] = Field(
        default="single",
        description="How /dashboard gathers its data: one SQL statement, or three queries side"
        " by side.",
    )
    opentelemetry: bool = Field(
        default=False,
        description="FastAPI's own OpenTelemetry instrumentation. Off, pglayer's metrics and"
        " access log report the shop, and FastAPI skips looking up three OpenTelemetry"
        " providers (environment variables) on every request.",
    )
