"""The garbage collector's settings for a serving process (`tune_gc`)."""

from __future__ import annotations

import gc

__all__ = ["GC_THRESHOLD", "tune_gc"]

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
