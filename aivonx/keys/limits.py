"""Per-key limits: requests per minute, requests in flight, token quotas.

All in memory, checked in a few microseconds per request. `rpm` is a
sliding window of 60 s; `max_concurrent` counts requests admitted and not
yet finished (those waiting in the queue included); `daily_tokens` and
`monthly_tokens` count prompt plus completion tokens per UTC day and
month, seeded at start from the usage table. A stream that was admitted
is never cut for its tokens: the quota refuses the next request.
"""
from __future__ import annotations

import calendar
import math
import time
from collections import deque
from dataclasses import dataclass, field

from .keyring import Key

WINDOW = 60.0
DAY = 86400


class LimitExceeded(Exception):
    """A request over one of its key's limits: which, and when to retry."""

    def __init__(self, limit: str, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.limit = limit
        self.message = message
        self.retry_after = max(1, retry_after)


def utc_day(now: float) -> int:
    return int(now // DAY)


def utc_month(now: float) -> tuple[int, int]:
    moment = time.gmtime(now)
    return moment.tm_year, moment.tm_mon


def next_month(now: float) -> float:
    year, month = utc_month(now)
    year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return calendar.timegm((year, month, 1, 0, 0, 0))


@dataclass(eq=False)
class KeyUse:
    """What one key is using now."""
    recent: deque = field(default_factory=deque)   # admission times within the window
    in_flight: int = 0
    day: int = -1
    day_tokens: int = 0
    month: tuple[int, int] = (0, 0)
    month_tokens: int = 0

    def roll(self, now: float) -> None:
        day, month = utc_day(now), utc_month(now)
        if day != self.day:
            self.day, self.day_tokens = day, 0
        if month != self.month:
            self.month, self.month_tokens = month, 0


def limited(key: Key) -> bool:
    """Whether the key has any limit to count."""
    return (key.rpm is not None or key.max_concurrent is not None
            or key.daily_tokens is not None or key.monthly_tokens is not None)


def over_concurrent(key: Key) -> LimitExceeded:
    return LimitExceeded("max_concurrent", f"key '{key.name}' has {key.max_concurrent} "
                         "requests in flight already (max_concurrent)", 1)


def over_rpm(key: Key, wait: float) -> LimitExceeded:
    """`wait`: seconds until the oldest request of the window leaves it."""
    return LimitExceeded("rpm", f"key '{key.name}' made {key.rpm} requests in the last "
                         "minute (rpm)", math.ceil(wait))


def over_daily(key: Key, now: float) -> LimitExceeded:
    return LimitExceeded("daily_tokens", f"key '{key.name}' used its {key.daily_tokens} "
                         "tokens of today, UTC (daily_tokens)",
                         math.ceil((utc_day(now) + 1) * DAY - now))


def over_monthly(key: Key, now: float) -> LimitExceeded:
    return LimitExceeded("monthly_tokens", f"key '{key.name}' used its {key.monthly_tokens} "
                         "tokens of this month, UTC (monthly_tokens)",
                         math.ceil(next_month(now) - now))


class Limits:
    def __init__(self) -> None:
        self.uses: dict[int, KeyUse] = {}

    def use(self, key_id: int) -> KeyUse:
        use = self.uses.get(key_id)
        if use is None:
            use = self.uses[key_id] = KeyUse()
        return use

    def admit(self, key: Key, now: float) -> None:
        """Count a request against its key, or LimitExceeded (nothing counted)."""
        use = self.use(key.id)
        if key.max_concurrent is not None and use.in_flight >= key.max_concurrent:
            raise over_concurrent(key)
        recent = use.recent
        if key.rpm is not None:
            cutoff = now - WINDOW
            while recent and recent[0] <= cutoff:
                recent.popleft()
            if len(recent) >= key.rpm:
                raise over_rpm(key, recent[-key.rpm] + WINDOW - now)
        if key.daily_tokens is not None or key.monthly_tokens is not None:
            use.roll(now)
            if key.daily_tokens is not None and use.day_tokens >= key.daily_tokens:
                raise over_daily(key, now)
            if key.monthly_tokens is not None and use.month_tokens >= key.monthly_tokens:
                raise over_monthly(key, now)
        if key.rpm is not None:
            recent.append(now)
        use.in_flight += 1

    def record(self, key: Key, now: float) -> None:
        """Count a request admitted elsewhere (the cluster-wide limits), so
        that these counters are current should they have to decide alone."""
        use = self.use(key.id)
        if key.rpm is not None:
            recent = use.recent
            cutoff = now - WINDOW
            while recent and recent[0] <= cutoff:
                recent.popleft()
            recent.append(now)
        use.in_flight += 1

    def done(self, key: Key) -> None:
        use = self.uses.get(key.id)
        if use is not None and use.in_flight > 0:
            use.in_flight -= 1

    def add_tokens(self, key_id: int, tokens: int, now: float) -> None:
        use = self.use(key_id)
        use.roll(now)
        use.day_tokens += tokens
        use.month_tokens += tokens

    def seed(self, key_id: int, day_tokens: int, month_tokens: int, now: float) -> None:
        """Tokens already used this UTC day and month (from the usage table)."""
        use = self.use(key_id)
        use.roll(now)
        use.day_tokens, use.month_tokens = day_tokens, month_tokens
