"""pglayer's JSON: records, mappings, models, exact decimals and UTC datetimes, one way.

Responses (`pglayer.fastapi.json_response`) and stored idempotent responses use it, so an
answer replayed from storage is the same text as the first.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

import asyncpg
import orjson
from pydantic import BaseModel
from pydantic_core import PydanticSerializationError, to_jsonable_python

__all__ = [
    "OPTIONS",
    "default",
    "dumps",
    "json_decode",
    "json_encode",
    "jsonb_decode",
    "jsonb_encode",
]

# Datetimes as Pydantic writes them ("…Z" for UTC), so both paths answer the same text.
OPTIONS = orjson.OPT_UTC_Z


def default(value: Any) -> Any:
    """What orjson cannot write by itself, as JSON values."""
    if isinstance(value, asyncpg.Record):
        return dict(value)
    if isinstance(value, Decimal):
        return str(value)  # money stays exact: "12.50", never a float
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Mapping):
        return dict(value)
    if not isinstance(value, bytes):  # bytea: no text of it is the one a client expects
        # asyncpg's UUID subclass, intervals, inet and cidr, as Pydantic writes them.
        with contextlib.suppress(PydanticSerializationError):
            return to_jsonable_python(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def dumps(content: Any) -> bytes:
    """`content` as JSON bytes: records, mappings, lists, models, Decimals as strings."""
    return orjson.dumps(content, default=default, option=OPTIONS)


# The codecs of json and jsonb parameters and columns. In: what `default` writes (Decimals
# as strings, records, models), datetimes as before ("+00:00"). Out: orjson's, except where
# it is not exact: integers of 19 digits or more (orjson makes those past 64 bits floats)
# and numbers past a float's range, which it refuses (PostgreSQL keeps both): the standard
# library's parser then, whose integers are exact.
_LONG_NUMBER = re.compile(rb"\d{19}")
_JSONB_VERSION = b"\x01"


def json_encode(value: Any) -> bytes:
    try:
        out = orjson.dumps(value, default=default)
    except orjson.JSONEncodeError:
        # An integer past 64 bits, which orjson refuses (one read from jsonb, say): the
        # standard library's writer has them exact; what it cannot write either is refused.
        return json.dumps(value, default=default, allow_nan=False, separators=(",", ":")).encode()
    if b"null" in out:
        _finite(value)  # orjson writes NaN and infinity as null: refused, not changed
    return out


def json_decode(data: bytes) -> Any:
    if _LONG_NUMBER.search(data) is None:
        with contextlib.suppress(orjson.JSONDecodeError):
            return orjson.loads(data)
    return json.loads(data)


def jsonb_encode(value: Any) -> bytes:
    return _JSONB_VERSION + json_encode(value)


def jsonb_decode(data: bytes) -> Any:
    return json_decode(data[1:])


def _finite(value: Any) -> None:
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("NaN and infinity have no JSON form")
    elif isinstance(value, dict):
        for item in value.values():
            _finite(item)
    elif isinstance(value, list | tuple):
        for item in value:
            _finite(item)
