"""Request and response bodies."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, TypeVar

from email_validator import EmailNotValidError, validate_email
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)

from pglayer.fastapi import MAX_ID

__all__ = [
    "MAX_ID",
    "MONEY_PATTERN",
    "Account",
    "CursorId",
    "CursorTime",
    "Dashboard",
    "Deposit",
    "Email",
    "Id",
    "Money",
    "MoneyIn",
    "Name",
    "Order",
    "OrderCreate",
    "Product",
    "ProductCreate",
    "Transfer",
    "TransferCreate",
    "User",
    "UserCreate",
]

MONEY_PATTERN = r"^[0-9]+(\.[0-9]{1,2})?$"
T = TypeVar("T")


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


def _email(value: str) -> str:
    try:
        # `test_environment`: `.test` domains (RFC 6761) are well-formed addresses too;
        # `strict`: RFC 5321's length limits too (64 before the @).
        validate_email(value, check_deliverability=False, test_environment=True, strict=True)
    except EmailNotValidError as exc:
        raise ValueError(f"not a valid email address: {exc}") from None
    return value  # stored as given, unique by its key: migrations 0004, 0008


Name = Annotated[str, Field(strict=True, min_length=1, max_length=200), AfterValidator(_no_nul)]
_EMAIL_SCHEMA = Field(json_schema_extra={"format": "email"})
Email = Annotated[
    str,
    Field(strict=True, min_length=3, max_length=254),
    _EMAIL_SCHEMA,
    AfterValidator(_no_nul),
    AfterValidator(_email),
]
# ASCII digits only (`\d` would take any script's digits), the whole string (`$` alone
# would allow a final newline).
_MONEY = re.compile(r"[0-9]+(?:\.[0-9]{1,2})?", re.ASCII)
_MONEY_DIGITS = 15  # integer digits past any amount's bound: refused before Decimal()
_MONEY_SCHEMA = WithJsonSchema({"type": "string", "pattern": MONEY_PATTERN, "examples": ["12.50"]})


def _parse_money(value: object) -> Decimal:
    # A string only: a JSON number cannot carry cents exactly, and the schema says string.
    if not isinstance(value, str):
        # pydantic turns a ValueError (not a TypeError) into a 422 field error.
        raise ValueError('must be a decimal string such as "12.50"')  # noqa: TRY004
    if not _MONEY.fullmatch(value):
        raise ValueError('must be ASCII digits with at most two decimal places, such as "12.50"')
    if len(value.partition(".")[0].lstrip("0")) > _MONEY_DIGITS:  # "0001" is 1
        raise ValueError("is too large")
    return Decimal(value)


Id = Annotated[int, Field(strict=True, ge=1, le=MAX_ID)]
"""An id in a JSON body: a JSON integer (not a string, float or bool), 1..2^63-1."""
CursorId = Annotated[int, Field(strict=True, ge=1, le=MAX_ID)]
"""An id inside a cursor: what we wrote there, so anything else is a tampered cursor."""


def _in_utc(value: datetime) -> datetime:
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("is out of range") from None


CursorTime = Annotated[AwareDatetime, AfterValidator(_in_utc)]
"""A time inside a cursor: what we wrote there (UTC, in range), else a tampered cursor."""
MoneyIn = Annotated[Decimal, BeforeValidator(_parse_money), _MONEY_SCHEMA]
Money = Annotated[
    Decimal,
    PlainSerializer(lambda d: f"{d:.2f}", return_type=str, when_used="always"),
    _MONEY_SCHEMA,
]


class UserCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name
    email: Email


class User(BaseModel):
    id: Id
    name: str
    email: Annotated[str, _EMAIL_SCHEMA]
    created_at: datetime


class Account(BaseModel):
    user_id: Id
    balance: Money


class ProductCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name
    price: Annotated[
        MoneyIn, Field(gt=0, le=Decimal("9999999999.99"), description="> 0, ≤ 9999999999.99")
    ]
    stock: Annotated[int, Field(strict=True, ge=0, le=2**31 - 1)]


class Product(BaseModel):
    id: Id
    name: str
    price: Money
    stock: Annotated[int, Field(ge=0, le=2**31 - 1)]


class OrderCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: Id
    product_id: Id
    quantity: Annotated[int, Field(strict=True, ge=1, le=1000)]


class Order(BaseModel):
    id: Id
    user_id: Id
    product_id: Id
    quantity: Annotated[int, Field(ge=1, le=1000)]
    unit_price: Money
    total: Money
    created_at: datetime


class Deposit(BaseModel):
    model_config = ConfigDict(extra="forbid")

    amount: Annotated[MoneyIn, Field(gt=0, le=Decimal(1_000_000), description="> 0, ≤ 1000000")]


class TransferCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    from_user_id: Id
    to_user_id: Id
    amount: Annotated[
        MoneyIn,
        Field(gt=0, le=Decimal("999999999999.99"), description="> 0, ≤ 999999999999.99"),
    ]

    @field_validator("to_user_id")
    @classmethod
    def _distinct(cls, to_user_id: int, info: ValidationInfo) -> int:
        if info.data.get("from_user_id") == to_user_id:
            raise ValueError("must differ from from_user_id")
        return to_user_id


class Transfer(BaseModel):
    id: Id
    from_user_id: Id
    to_user_id: Id
    amount: Money
    created_at: datetime


class Dashboard(BaseModel):
    user: User
    recent_orders: Annotated[list[Order], Field(max_length=20)]
    balance: Money
