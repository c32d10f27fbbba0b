"""The shop's own settings (`PGLAYER_*`); the database's are `pglayer.DatabaseSettings`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["ShopSettings"]


class ShopSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PGLAYER_", extra="ignore", frozen=True)

    admin_token: SecretStr | None = None
    # Signs pagination cursors; every worker must share it. Unset: derived from DATABASE_URL.
    cursor_secret: SecretStr | None = None
    # Orders and transfers wait at most this long for a row another request holds locked,
    # then answer 503 `busy` (well below the request deadline: a user is waiting).
    write_lock_timeout: float = Field(default=1.0, gt=0)
    # Idempotency keys are kept this long; a key resent later is a new order. Expired keys
    # are deleted in small batches every `idempotency_sweep_interval` seconds.
    idempotency_key_ttl: float = Field(default=86_400.0, gt=0)
    idempotency_sweep_interval: float = Field(default=60.0, gt=0)
    max_body_size: int = Field(default=1 << 20, gt=0)
    # /health/ready answers 503 when `SELECT 1` takes longer than this.
    ready_timeout: float = Field(default=1.0, gt=0)
    # How /dashboard gathers its data: one SQL statement, or three queries side by side.
    dashboard_strategy: Literal["single", "concurrent"] = "single"
    # Logs: None leaves logging to the host (tests, an embedding app); `pglayer serve`
    # defaults to text. One line per request on `pglayer.access` when `access_log`.
    log_format: Literal["text", "json"] | None = None
    log_level: str = "INFO"
    access_log: bool = False
    # Prometheus HTTP metrics (pool metrics are read at scrape time and cost nothing).
    metrics: bool = True
    # See pglayer.fastapi.setup(freeze_gc=...): fewer and shorter GC pauses under load.
    freeze_gc: bool = False  # `pglayer serve` turns it on
