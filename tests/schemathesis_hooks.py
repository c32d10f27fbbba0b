"""Schemathesis hooks for tests/test_schemathesis.py (loaded by its `schemathesis run`).

Some requests a JSON Schema calls valid are refused (422) by the contract for reasons no
schema can state: an amount out of range (money is a patterned string), transfer to oneself,
an `Idempotency-Key` sent again with another body, `2.0` for an integer (JSON Schema 2020-12
counts it as one; the contract does not), a user's orders cursor on another user's list.
Such cases are changed, as little as possible, into
ones the contract accepts; schemathesis then classifies them again, by what is sent.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Callable, MutableMapping
from decimal import Decimal
from typing import Any, TypeVar, cast

import schemathesis
from schemathesis import Case, HookContext

from pglayer.fastapi import Cursors

_MONEY = re.compile(r"[0-9]+(?:\.[0-9]{1,2})?")
_PRINTABLE_KEY = re.compile(r"[\x20-\x7e]{1,200}")
_MAX_ID = 2**63 - 1
_keys = itertools.count(1)
_cursors = Cursors(os.environ.get("PGLAYER_CURSOR_SECRET", "unset"))
ORDERS_SINCE = "2026-01-01T00:00:00+00:00"
F = TypeVar("F", bound=Callable[..., Any])


def _hook(name: str) -> Callable[[F], F]:
    """`schemathesis.hook(name)`, typed."""
    return cast("Callable[[F], F]", schemathesis.hook(name))


def _whole_floats_as_ints(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _whole_floats_as_ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_whole_floats_as_ints(v) for v in value]
    return value


def _in_range(body: Any, field: str, most: str) -> Any:
    """`body` with `field` made a valid amount if it is a well-formed one out of (0, most]."""
    if isinstance(body, dict):
        value = body.get(field)
        amount = Decimal(value) if isinstance(value, str) and _MONEY.fullmatch(value) else None
        if amount is not None and not 0 < amount <= Decimal(most):
            body[field] = "12.50"
    return body


@_hook("before_call")
def contract_rules(ctx: HookContext, case: Case[Any], kwargs: dict[str, Any]) -> None:
    """Applied to every case of every phase, just before it is sent (and re-classified)."""
    operation = (case.operation.method.upper(), case.operation.path)
    body = case.body = _whole_floats_as_ints(case.body)
    if operation == ("POST", "/accounts/{user_id}/deposits"):
        _in_range(body, "amount", "1000000")
    elif operation == ("POST", "/products"):
        _in_range(body, "price", "9999999999.99")
    elif operation == ("POST", "/transfers"):
        _in_range(body, "amount", "999999999999.99")
        if isinstance(body, dict):
            source, target = body.get("from_user_id"), body.get("to_user_id")
            if type(source) is int and source == target and 1 <= source <= _MAX_ID:
                body["to_user_id"] = source % _MAX_ID + 1
    elif operation == ("GET", "/users/{user_id}/orders"):
        _orders_cursor_of(case)
    keyed = {("POST", "/orders"), ("POST", "/transfers"), ("POST", "/accounts/{user_id}/deposits")}
    if operation in keyed and isinstance(case.headers, MutableMapping):
        # A new key per case: generated keys repeat, and a key resent with another body is 422.
        key = case.headers.get("Idempotency-Key")
        if isinstance(key, str) and _PRINTABLE_KEY.fullmatch(key):
            case.headers["Idempotency-Key"] = f"schemathesis-{next(_keys)}"


def _orders_cursor_of(case: Case[Any]) -> None:
    """A cursor for the user whose list is asked: the configured one is user 1's."""
    user = (case.path_parameters or {}).get("user_id")
    query = case.query
    if isinstance(query, MutableMapping) and "after" in query and user is not None:
        query["after"] = _cursors.encode(ORDERS_SINCE, 1, of=f"orders of user {user}")
