"""Path parameters shared by routes: ids in canonical decimal (`pglayer.fastapi.PathId`)."""

from __future__ import annotations

from pglayer.fastapi import PathId

__all__ = ["OrderId", "ProductId", "TransferId", "UserId"]

UserId = PathId
ProductId = PathId
OrderId = PathId
TransferId = PathId
