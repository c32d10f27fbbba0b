"""Path parameters shared by routes: ids in canonical decimal (`models.DecimalInt`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path

from pglayer_shop.models import MAX_ID, DecimalInt

__all__ = ["OrderId", "ProductId", "TransferId", "UserId"]

_ID_PARAM = DecimalInt(1, MAX_ID)
_ID = "A positive 64-bit id, in decimal"

UserId = Annotated[int, Path(description=_ID), _ID_PARAM]
ProductId = Annotated[int, Path(description=_ID), _ID_PARAM]
OrderId = Annotated[int, Path(description=_ID), _ID_PARAM]
TransferId = Annotated[int, Path(description=_ID), _ID_PARAM]
