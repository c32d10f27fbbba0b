"""The garbage collector's settings for a serving process (`tune_gc`)."""

from __future__ import annotations

import asyncio
import gc

__all__ = ["GC_THRESHOLD", "collect_soon", "tune_gc"]

# Container objects allocated (net) between young collections; CPython's default is 700.
# A request allocates ~50, so at the default every ~14 requests trigger one, and under high
# concurrency the objects of requests still in flight survive it, are promoted, and make the
# older collections frequent and long. Measured (one worker, 223 clients, `GET /users/{id}`):
# a GC callback timed the collections at ~90 us per request with the startup heap frozen
# and the default threshold, ~7 us at 50,000 (RSS unchanged: 67-74 MiB). A serving process
# makes no cyclic garbage per request (none saved in 3 s of load), so what reaches the
# threshold is drift, and a young collection costs ~1 us per object in flight: at 1,024
# clients ~75 ms every ~2 s at 50,000 (9-15 us per request), at 200,000 one of ~115 ms
# in 12 s (0-6 us per request); a retry storm's RSS the same (71-72 MiB).
GC_THRESHOLD = 200_000

_tuned = False


def tune_gc() -> None:
    """Once per process, after startup: move what is alive (modules, the app, its schemas) out
    of the collector's reach and collect the young generation less often."""
    global _tuned
    if _tuned:
        return
    _tuned = True
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD, middle, old)


_COLLECT_AFTER = 1.0  # seconds
_collecting: asyncio.TimerHandle | None = None


def collect_soon() -> None:
    """In a tuned process, one full collection a second from now, however many ask.

    What a connection that ended abruptly leaves in reference cycles (a WebSocket's partial
    message, up to its size bound) is then freed at once, not after 200,000 allocations
    (under load that allocates and frees, none: 2.7 GB kept after 80 dropped sockets). The
    startup heap is frozen, so a full collection scans only what came after it."""
    global _collecting
    if _tuned and _collecting is None:
        _collecting = asyncio.get_running_loop().call_later(_COLLECT_AFTER, _collect)


def _collect() -> None:
    global _collecting
    _collecting = None
    gc.collect()
