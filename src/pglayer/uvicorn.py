"""Serve a pglayer app with plain uvicorn as `pglayer serve` does.

    uvicorn myapp:app --loop pglayer.uvicorn:new_event_loop --http pglayer.uvicorn:HttpProtocol

`new_event_loop` makes a uvloop loop whose TCP servers accept every connection waiting in
the kernel's queue at each turn (plain uvloop accepts one); `HttpProtocol` is uvicorn's
httptools protocol with bounds on the size and the time of a request's head and body
(`PGLAYER_MAX_HEADER_SIZE`, `PGLAYER_HEADER_TIMEOUT`, `PGLAYER_BODY_TIMEOUT`), which also
answers the app's early refusals while its database is saturated. Both need the `cli`
extra (`uvicorn[standard]`).
"""

from __future__ import annotations

from pglayer._http import BoundedHttpToolsProtocol as HttpProtocol
from pglayer._loop import new_event_loop

__all__ = ["HttpProtocol", "new_event_loop"]
