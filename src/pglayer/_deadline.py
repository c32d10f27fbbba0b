"""A per-task deadline that bounds acquires, queries and retries together."""

from __future__ import annotations

from pglayer._context import bounded as deadline
from pglayer._context import remaining

__all__ = ["deadline", "remaining"]
