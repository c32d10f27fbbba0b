"""Request and response bodies."""

from __future__ import annotations

import re
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Annotated, Generic, TypeVar

from email_validator import EmailNotValidError, validate_email
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    model_validator,
)

__all__ = [
    "Account",
    "Dashboard",
    "Deposit",
    "Email",
    "Id",
    "Money",
    "Name",
    "Order",
    "OrderCreate",
    "Page",
    "Product",
    "ProductCreate",
    "Transfer",
    "TransferCreate",
    "User",
    "UserCreate",
]

MAX_ID = 2**63 - 1
T = TypeVar("T")


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


def _email(value: str) -> str:
    try:
        # `test_environment`: `.test` domains (RFC 6761) are well-formed addresses too.
        validate_email(value, check_deliverability=False, test_environment=True)
    except EmailNotValidError as exc:
        raise ValueError(f"not a valid email address: {exc}") from None
    return value  # stored NFC-normalised, unique by its key: migration 0004_email_keys


Name = Annotated[str, Field(strict=True, min_length=1, max_length=200), AfterValidator(_no_nul)]
Email = Annotated[
    str,
    Field(strict=True, min_length=3, max_length=254),
    AfterValidator(_no_nul),
    AfterValidator(_email),
]
_MONEY = re.compile(r"^\d{1,12}(\.\d{1,2})?$")


def _parse_money(value: object) -> Decimal:
    # Strings ("12.50") and whole numbers only: a JSON float cannot carry cents exactly.
    if isinstance(value, bool) or not isinstance(value, str | int | Decimal):
        # pydantic turns a ValueError (not a TypeError) into a 422 field error.
        raise ValueError('must be a decimal string such as "12.50" (or a whole number)')  # noqa: TRY004
    text = str(value)
    if not _MONEY.match(text):
        raise ValueError("must be a non-negative amount with at most two decimal places")
    try:
        return Decimal(text)
    except InvalidOperation:
        raise ValueError("not a decimal amount") from None


Id = Annotated[int, Field(strict=True, gt=0, le=MAX_ID)]
MoneyIn = Annotated[Decimal, BeforeValidator(_parse_money), Field(examples=["12.50"])]
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


class ProductCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name
    price: Annotated[MoneyIn, Field(gt=0, le=Decimal("9999999999.99"))]
    stock: Annotated[int, Field(strict=True, ge=0, le=2**31 - 1)]


class Product(BaseModel):
    id: int
    name: str
    price: Money
    stock: int


class OrderCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: Id
    product_id: Id
    quantity: Annotated[int, Field(strict=True, ge=1, le=1000)]


class Order(BaseModel):
    id: int
    user_id: int
    product_id: int
    quantity: int
    unit_price: Money
    total: Money
    created_at: datetime


class Deposit(BaseModel):
    model_config = ConfigDict(extra="forbid")

    amount: Annotated[MoneyIn, Field(gt=0, le=Decimal(1_000_000))]


class TransferCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    from_user_id: Id
    to_user_id: Id
    amount: Annotated[MoneyIn, Field(gt=0, le=Decimal("999999999999.99"))]

    @model_validator(mode="after")
    def _distinct(self) -> TransferCreate:
        if self.from_user_id == self.to_user_id:
            raise ValueError("from_user_id and to_user_id must differ")
        return self


class Transfer(BaseModel):
    id: int
    from_user_id: int
    to_user_id: int
    amount: Money
    created_at: datetime


class Dashboard(BaseModel):
    user: User
    recent_orders: list[Order]
    balance: Money
