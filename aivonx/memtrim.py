"""Hand the memory of a burst back to the system once the burst is over.

After thousands of streams closed, the proxy's RSS stayed near its peak:
the memory was free inside the process but not returned. Two things kept
it: the handlers of finished requests sit in reference cycles (Tornado's
RequestHandler points at itself through its ui namespace) that only a full
collection frees, and glibc's malloc keeps freed heap pages mapped
(fragmentation leaves the top of the heap in use, so it never shrinks).

The trimmer watches the relay's requests in flight. When a burst of at
least `min_peak` requests has come down to an eighth of its peak, it runs
one full garbage collection and then `malloc_trim(0)` in a worker thread
(glibc releases the free pages in the middle of the heap as well; ctypes
lets go of the GIL while it runs). The collection runs on the event loop:
it costs a few milliseconds once per burst, when traffic is light by
definition, instead of holding tens of megabytes for good.
"""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import time
from typing import Callable

from tornado.ioloop import PeriodicCallback

log = logging.getLogger("aivonx.memtrim")

CHECK_INTERVAL = 2.0  # seconds between two looks at the requests in flight
MIN_PEAK = 256        # a burst smaller than this leaves too little behind to matter


def _load_malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where there is none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


class MemoryTrimmer:
    def __init__(self, in_flight: Callable[[], int], peak: Callable[[], int],
                 reset_peak: Callable[[], None], *, interval: float = CHECK_INTERVAL,
                 min_peak: int = MIN_PEAK) -> None:
        self.in_flight = in_flight
        self.peak = peak
        self.reset_peak = reset_peak
        self.interval = interval
        self.min_peak = min_peak
        self.malloc_trim = _load_malloc_trim()
        self.trims = 0
        self._timer: PeriodicCallback | None = None
        self._trimming: asyncio.Future | None = None
        self._quiet = False

    def start(self) -> None:
        # What exists once the proxy is up (modules, settings, the registry)
        # lives as long as the process: out of the collector's sight, a full
        # collection walks only what the traffic made.
        gc.freeze()
        self._timer = PeriodicCallback(self.check, self.interval * 1000)
        self._timer.start()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.stop()
            self._timer = None

    def check(self) -> None:
        """Trim once a burst has passed, at the second quiet look in a row (the
        connections of the last requests take a moment to wind down); the
        peak starts again from then."""
        peak, now = self.peak(), self.in_flight()
        if peak < self.min_peak or now > peak // 8 or self._trimming is not None:
            self._quiet = False
            return
        if not self._quiet:
            self._quiet = True
            return
        self._quiet = False
        self.reset_peak()
        started = time.perf_counter()
        gc.collect()
        collected = time.perf_counter() - started
        self.trims += 1
        if self.malloc_trim is None:
            log.info("burst of %d requests over: full collection in %.1f ms", peak,
                     collected * 1000)
            return
        loop = asyncio.get_running_loop()
        self._trimming = loop.run_in_executor(None, self.malloc_trim, 0)

        def trimmed(_: asyncio.Future) -> None:
            self._trimming = None
            log.info("burst of %d requests over: full collection in %.1f ms, memory "
                     "handed back", peak, collected * 1000)

        self._trimming.add_done_callback(trimmed)
