"""Request and response bodies."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Generic, TypeVar

from email_validator import EmailNotValidError, validate_email
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    PlainSerializer,
    WithJsonSchema,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema

__all__ = [
    "MAX_ID",
    "MONEY_PATTERN",
    "Account",
    "Dashboard",
    "DecimalInt",
    "Deposit",
    "Email",
    "Id",
    "Money",
    "MoneyIn",
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
MONEY_PATTERN = r"^[0-9]+(\.[0-9]{1,2})?$"
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
    if len(value.partition(".")[0]) > _MONEY_DIGITS:
        raise ValueError("is too large")
    return Decimal(value)


@dataclass(frozen=True)
class DecimalInt:
    """A path or query `int` written `[1-9][0-9]*`, between `ge` (at least 1) and `le`.

    pydantic's lax int parsing takes `1_0`, `1.0`, `+7`, `01` and ` 1`; this is a
    pydantic-core chain (pattern, then int), so it costs no Python call per request.
    """

    ge: int
    le: int

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        digits = core_schema.custom_error_schema(
            core_schema.str_schema(pattern=rf"^[1-9][0-9]{{0,{len(str(self.le)) - 1}}}$"),
            custom_error_type="int_decimal",
            custom_error_message=f"Input should be a whole number from {self.ge} to {self.le}"
            " in plain decimal digits (no sign, leading zero, point or space)",
        )
        return core_schema.chain_schema([digits, core_schema.int_schema(ge=self.ge, le=self.le)])

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        out: JsonSchemaValue = {"type": "integer", "minimum": self.ge, "maximum": self.le}
        if self.le > 2**31 - 1:
            out["format"] = "int64"
        return out


Id = Annotated[int, Field(strict=True, ge=1, le=MAX_ID)]
"""An id in a JSON body: a JSON integer (not a string, float or bool), 1..2^63-1."""
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
    id: int
    name: str
    email: Annotated[str, _EMAIL_SCHEMA]
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
    price: Annotated[
        MoneyIn, Field(gt=0, le=Decimal("9999999999.99"), description="> 0, ≤ 9999999999.99")
    ]
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

    amount: Annotated[MoneyIn, Field(gt=0, le=Decimal(1_000_000), description="> 0, ≤ 1000000")]


class TransferCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    from_user_id: Id
    to_user_id: Id
    amount: Annotated[
        MoneyIn,
        Field(gt=0, le=Decimal("999999999999.99"), description="> 0, ≤ 999999999999.99"),
    ]

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
