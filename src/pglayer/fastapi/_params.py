"""Integers in paths and queries written as people write them, and nothing else.

pydantic's lax int parsing takes `1_0`, `1.0`, `+7`, `01` and ` 1` from a URL; an id or a page
size is `[1-9][0-9]*` within its bounds, else a 422.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Path
from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema

__all__ = ["MAX_ID", "DecimalInt", "PathId"]

MAX_ID = 2**63 - 1


@dataclass(frozen=True, slots=True)
class DecimalInt:
    """A path or query `int` written `[1-9][0-9]*`, between `ge` (at least 1) and `le`.

    A pydantic-core chain (pattern, then int): no Python call per request.
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


PathId = Annotated[int, Path(description="A positive 64-bit id, in decimal"), DecimalInt(1, MAX_ID)]
"""A path id: `[1-9][0-9]*`, 1..2^63-1, else 422."""
