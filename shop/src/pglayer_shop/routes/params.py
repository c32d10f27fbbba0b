"""Path parameters shared by routes (ids in canonical decimal, `pglayer.fastapi.PathId`),
and the headers of a 201 for the OpenAPI document."""

from __future__ import annotations

from typing import Any

from pglayer.fastapi import PathId

__all__ = ["OrderId", "ProductId", "TransferId", "UserId", "created", "replayed"]

UserId = PathId
ProductId = PathId
OrderId = PathId
TransferId = PathId


def created(*, replayable: bool = False) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a 201 with `Location` (and `Idempotent-Replayed`, if `replayable`)."""
    headers: dict[str, Any] = {
        "Location": {"description": "The new resource", "schema": {"type": "string"}}
    }
    if replayable:
        headers.update(replayed())
    return {201: {"description": "Created", "headers": headers}}


def replayed() -> dict[str, Any]:
    """The `Idempotent-Replayed` header of an answer that may be a stored one."""
    return {
        "Idempotent-Replayed": {
            "description": "`true` when this is the stored answer to an earlier request with"
            " the same `Idempotency-Key` and body",
            "schema": {"type": "string", "enum": ["true"]},
        }
    }
