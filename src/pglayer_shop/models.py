"""Request and response bodies."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Generic, TypeVar

from email_validator import EmailNotValidError, validate_email
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainSerializer

__all__ = ["Account", "Email", "Money", "Name", "Page", "User", "UserCreate"]

MAX_ID = 2**63 - 1
T = TypeVar("T")


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


def _email(value: str) -> str:
    try:
        validate_email(value, check_deliverability=False)
    except EmailNotValidError as exc:
        raise ValueError(f"not a valid email address: {exc}") from None
    return value  # stored exactly as given; uniqueness ignores case


Name = Annotated[str, Field(strict=True, min_length=1, max_length=200), AfterValidator(_no_nul)]
Email = Annotated[
    str,
    Field(strict=True, min_length=3, max_length=254),
    AfterValidator(_no_nul),
    AfterValidator(_email),
]
Money = Annotated[
    Decimal,
    PlainSerializer(lambda d: f"{d:.2f}", return_type=str, when_used="always"),
    Field(examples=["12.50"]),
]


class UserCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name
    email: Email


class User(BaseModel):
    id: int
    name: str
    email: str
    created_at: datetime


class Account(BaseModel):
    user_id: int
    balance: Money


class Page(BaseModel, Generic[T]):
    """One page of a list; pass `next_cursor` as `after` for the next."""

    items: list[T]
    next_cursor: str | None
