"""The memory trimmer hands a burst's memory back once, after the burst."""
from __future__ import annotations

from aivonx.memtrim import MemoryTrimmer


class Load:
    """Requests in flight and their peak, as the relay counts them."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0

    def set(self, n: int) -> None:
        self.now = n
        self.peak = max(self.peak, n)

    def reset(self) -> None:
        self.peak = self.now


def trimmer(load: Load) -> MemoryTrimmer:
    return MemoryTrimmer(lambda: load.now, lambda: load.peak, load.reset, min_peak=100)


async def test_a_burst_is_trimmed_at_the_second_quiet_look_and_only_once(io_loop):
    load = Load()
    trim = trimmer(load)
    load.set(500)
    trim.check()          # the burst is still on
    load.set(10)
    trim.check()          # quiet once: the last connections may still wind down
    assert trim.trims == 0
    trim.check()
    assert trim.trims == 1
    for _ in range(3):    # the same quiet traffic is no new burst
        trim.check()
    assert trim.trims == 1


async def test_small_bursts_and_busy_times_are_left_alone(io_loop):
    load = Load()
    trim = trimmer(load)
    load.set(99)          # below min_peak
    load.set(0)
    for _ in range(3):
        trim.check()
    load.set(400)
    for n in (300, 40, 300, 40):  # never quiet twice in a row
        load.set(n)
        trim.check()
    assert trim.trims == 0
