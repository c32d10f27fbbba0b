"""Passwords never survive masking."""

from __future__ import annotations

import pytest

from pglayer import DatabaseSettings, mask_dsn
from pglayer._dsn import describe_target


@pytest.mark.parametrize(
    ("dsn", "masked"),
    [
        ("postgresql://app:s3cret@db:5432/shop", "postgresql://app:***@db:5432/shop"),
        ("postgresql://app@db/shop", "postgresql://app@db/shop"),
        (
            "postgresql://app:p%40ss@db/shop?sslmode=require",
            "postgresql://app:***@db/shop?sslmode=require",
        ),
        (
            "postgresql://db/shop?user=app&password=s3cret",
            "postgresql://db/shop?user=app&password=***",
        ),
        (
            "host=db user=app password=s3cret dbname=shop",
            "host=db user=app password=*** dbname=shop",
        ),
        ("host=db password='a b' dbname=shop", "host=db password=*** dbname=shop"),
    ],
)
def test_mask_dsn_hides_the_password(dsn: str, masked: str) -> None:
    assert mask_dsn(dsn) == masked


def test_describe_target_names_user_host_port_and_database_only() -> None:
    assert (
        describe_target("postgresql://app:s3cret@db.internal:6432/shop")
        == "app@db.internal:6432/shop"
    )


def test_settings_read_database_url_and_keep_it_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://app:s3cret@db/shop")
    monkeypatch.setenv("PGLAYER_MAX_SIZE", "7")
    settings = DatabaseSettings()
    assert settings.dsn() == "postgresql://app:s3cret@db/shop"
    assert settings.max_size == 7
    assert "s3cret" not in repr(settings)
    assert "s3cret" not in str(settings.model_dump())


def test_settings_reject_min_size_above_max_size() -> None:
    with pytest.raises(ValueError, match="min_size"):
        DatabaseSettings(url="postgresql://x@y/z", min_size=5, max_size=2)
