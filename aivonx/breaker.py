"""The live-traffic circuit breaker of one node.

Probes run every few seconds; a node that flaps between them would keep
eating requests. This many transport failures within the window open the
circuit; it stays open for the cooldown, doubling each time it re-opens
soon after closing (the node is still flapping), up to the cap. Failures
this close together are one incident: a node that crashes fails every
request it was serving at the same instant, which is one failure of the
node, not several.
"""
from __future__ import annotations

import time
from collections import deque

FAILURES = 3
WINDOW = 60.0
COOLDOWN = 15.0
COOLDOWN_MAX = 300.0
INCIDENT = 1.0


class Breaker:
    def __init__(self) -> None:
        self.failures: deque[float] = deque()  # monotonic times of incidents
        self.until = 0.0                        # monotonic; open before this
        self.cooldown = COOLDOWN

    def is_open(self, now: float | None = None) -> bool:
        return (time.monotonic() if now is None else now) < self.until

    def record_failure(self, now: float | None = None) -> bool:
        """Count a failure; True when this one opened the circuit."""
        now = time.monotonic() if now is None else now
        if self.failures and now - self.failures[-1] < INCIDENT:
            return False
        self.failures.append(now)
        while self.failures and now - self.failures[0] > WINDOW:
            self.failures.popleft()
        if len(self.failures) < FAILURES or now < self.until:
            return False
        # Re-opening soon after the last opening means it is still flapping.
        if self.until and now - self.until < WINDOW:
            self.cooldown = min(self.cooldown * 2, COOLDOWN_MAX)
        else:
            self.cooldown = COOLDOWN
        self.until = now + self.cooldown
        self.failures.clear()
        return True
