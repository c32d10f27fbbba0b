"""The garbage collector's settings for a serving process (`tune_gc`)."""

from __future__ import annotations

import gc

__all__ = ["GC_THRESHOLD", "tune_gc"]

# Container objects allocated (net) between young collections; CPython's default is 700.
# A request allocates ~50, so at the default every ~14 requests trigger one, and under high
# concurrency the objects of requests still in flight survive it, are promoted, and make the
# older collections frequent and long. Measured (one worker, 223 clients, `GET /users/{id}`):
# a GC callback timed the collections at ~90 us per request with the startup heap frozen
# and the default threshold, ~7 us at 50,000 (RSS unchanged: 67-74 MiB).
GC_THRESHOLD = 50_000

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
