"""Path parameters shared by routes."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path

from pglayer_shop.models import MAX_ID

__all__ = ["UserId"]

UserId = Annotated[int, Path(gt=0, le=MAX_ID, description="A positive 64-bit id")]
