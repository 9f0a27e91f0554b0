"""Python's cyclic garbage collector paused while a measurement runs.

The load generator and the in-process limit run in the harness's process, beside the
synthetic world's hundreds of thousands of objects. A full collection there stalled the open
loop's generator for about 70 ms, about every 27 s at 480 requests/s (AMD EPYC): every request
due meanwhile was written that late, a few dozen requests, enough to set a 10 s point's p99 by
itself (BENCHMARKS.md, "The load generator's garbage collector"). adscore's
own process does not pay this: it freezes its start-up objects out of the collector's reach
(gc.freeze).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def collector_paused() -> Iterator[None]:
    """The collector off for the block, after one full collection before it starts.

    Reference counting still frees what a measurement drops; only cycles wait for the end, and a
    measurement of seconds makes few. The collector's state is restored after.
    """
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
