"""Passwords never survive masking."""

from __future__ import annotations

import pytest
from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from pglayer import DatabaseSettings, mask_dsn
from pglayer._dsn import describe_target
from pglayer._settings import invalid_fields


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


# Passwords with a character a URL reserves, written without percent-encoding: the parsers
# end the host part early, and the rest of the password looks like a port or a path.
UNENCODED = [
    "postgresql://app:Prim#Pass88@127.0.0.1:18460/app",
    "postgresql://app:S3cret/xyz@127.0.0.1:18460/app",
    "postgresql://app:S3cret?xyz@127.0.0.1:18460/app",
    "postgresql://app:123/xyz@127.0.0.1:18460/app",
    "postgresql://app:p@ss@127.0.0.1:18460/app",
]


def _leaked(text: str, dsn: str) -> list[str]:
    password = dsn.split("//app:", 1)[1].rsplit("@", 1)[0]
    for mark in "#?,@":
        password = password.replace(mark, "/")
    pieces = [password, *password.split("/")]
    return [p for p in pieces if len(p) >= 3 and p in text]


@pytest.mark.parametrize("dsn", UNENCODED)
def test_a_password_a_url_cannot_hold_unencoded_is_masked_whole(dsn: str) -> None:
    from pglayer import mask_text

    for said in (mask_dsn(dsn), describe_target(dsn), mask_text(f"cannot connect to {dsn}")):
        assert not _leaked(said, dsn), said
    assert "127.0.0.1" in describe_target(dsn)


@pytest.mark.parametrize("dsn", UNENCODED)
def test_settings_refuse_an_unencoded_password_without_quoting_it(dsn: str) -> None:
    with pytest.raises(ValueError, match="percent-encoded") as refused:
        DatabaseSettings(url=dsn)
    assert not _leaked(str(refused.value), dsn), str(refused.value)


def test_a_password_with_a_space_the_driver_takes_is_masked_in_log_text() -> None:
    from pglayer import mask_text

    said = mask_text("cannot connect to postgresql://u:Zq9 sp4ce@127.0.0.1/db: refused")
    assert "Zq9" not in said
    assert "sp4ce" not in said
    assert "127.0.0.1/db: refused" in said


def test_a_replica_list_split_inside_a_password_quotes_no_part_of_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The list's comma splits `987654321,Zq9`: its first part looks like a port.
    monkeypatch.setenv("PGLAYER_REPLICA_URLS", "postgresql://app:987654321,Zq9@127.0.0.1/app")
    with pytest.raises(ValueError, match="percent-encoded") as refused:
        DatabaseSettings(url="postgresql://app@127.0.0.1/app")
    assert "987654321" not in str(refused.value)
    assert "Zq9" not in str(refused.value)


@pytest.mark.parametrize(
    "name",
    ["statement_timeout", "lock_timeout", "idle_in_transaction_timeout",
     "client_connection_check_interval"],
)  # fmt: skip
def test_a_timeout_postgresql_cannot_take_is_refused_naming_it(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    # 3,000,000 s passed here, then every connect failed: "refused the connection (22023)".
    monkeypatch.setenv(f"PGLAYER_{name.upper()}", "3000000")
    with pytest.raises(ValueError, match=name):
        DatabaseSettings(url="postgresql://app@127.0.0.1/app")


def test_a_timeout_under_a_millisecond_is_one_not_none() -> None:
    # 0.0004 s became "0": no bound at all.
    settings = DatabaseSettings(url="postgresql://app@db/app", statement_timeout=0.0004)
    assert settings.server_settings()["statement_timeout"] == "1"
    assert DatabaseSettings(lock_timeout=0).server_settings()["lock_timeout"] == "0"


@pytest.mark.parametrize("name", ["shöp☃", "", "tab\there"])
def test_an_application_name_the_server_would_change_is_refused(name: str) -> None:
    # Stored as 'sh??p???': the budget no longer knew the app's own connections.
    with pytest.raises(ValueError, match="application_name"):
        DatabaseSettings(application_name=name)


def test_libpqs_connect_timeout_in_a_url_is_the_connect_timeout() -> None:
    # Sent on to the server as a setting, which refused every connection.
    url = "postgresql://app:pw@db/app?sslmode=require&connect_timeout=7&target_session_attrs=any"
    settings = DatabaseSettings(url=url, replica_urls=[f"{url}x"])
    assert settings.dsn() == "postgresql://app:pw@db/app?sslmode=require&target_session_attrs=any"
    assert settings.connect_timeout == 7
    assert "connect_timeout" not in settings.replica_urls[0].get_secret_value()
    told = DatabaseSettings(url=url, connect_timeout=3)
    assert told.connect_timeout == 3  # the setting itself wins


def test_a_url_with_a_stray_space_at_its_ends_is_taken() -> None:
    assert DatabaseSettings(url=" postgresql://app@db/app\n").dsn() == "postgresql://app@db/app"


def test_a_connect_timeout_in_a_url_that_is_not_a_number_is_the_urls_fault() -> None:
    with pytest.raises(ValueError, match=r"url\n.*connect_timeout 'soon' in the URL"):
        DatabaseSettings(url="postgresql://app@db/app?connect_timeout=soon")


def test_an_invalid_setting_is_named_by_its_variable_whatever_its_class() -> None:
    class BillingSettings(BaseSettings):
        model_config = SettingsConfigDict(env_prefix="billing_")
        retries: int = Field(default=1, ge=0)

    with pytest.raises(ValidationError) as refused:
        BillingSettings(retries=-1)
    assert invalid_fields(refused.value).startswith("BILLING_RETRIES: Input should be greater")
    with pytest.raises(ValidationError) as ours:
        DatabaseSettings(max_size=0)
    assert invalid_fields(ours.value).startswith("PGLAYER_MAX_SIZE: ")
