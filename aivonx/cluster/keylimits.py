"""A key's limits counted over every instance, in Redis (--redis).

`rpm` is a sorted set of admission times (Redis's clock) over a sliding
60 s window; `daily_tokens` and `monthly_tokens` are counters per UTC day
and month that expire after their period, seeded when absent from what
this instance knows (the usage table at start plus its own use since) and
raised by INCRBY after each request. One script checks and counts rpm and
the quotas at once, one round trip per admitted request; `max_concurrent`
is a counted lease (aivonx.cluster.leases), so the requests of an instance
killed with -9 stop counting within the lease time. Keys without limits
never reach Redis.

While Redis is unreachable the local Limits decide, each instance counting
its own requests; they are kept current meanwhile, and their token counts
are read again from the usage table (which every instance writes) whenever
Redis is lost or answers again, so a quota spent through the others holds.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import math
from typing import Any, Callable

from redis.exceptions import RedisError

from .. import store
from ..keys.keyring import Key
from ..keys.limits import (DAY, Limits, next_month, over_concurrent, over_daily,
                           over_monthly, over_rpm, utc_day, utc_month)

log = logging.getLogger("aivonx.cluster")

KEY_PREFIX = "aivonx:key:"
WAIT = 1.0  # seconds an admission waits, at most, for a reseed or a release
MARGIN = 3600   # seconds a period's counter outlives its period (clock skew)

# KEYS: the rpm set, the day's counter, the month's counter.
# ARGV: rpm (0: none), admission id, daily_tokens, monthly_tokens (0: none),
#       day seed, month seed, day ttl s, month ttl s.
# {0, 0} admitted (and counted); {1, ms until the window has room} over rpm;
# {2, 0} over daily_tokens; {3, 0} over monthly_tokens (nothing counted).
ADMIT = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local rpm = tonumber(ARGV[1])
if rpm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 60000)
  if redis.call('ZCARD', KEYS[1]) >= rpm then
    local oldest = redis.call('ZRANGE', KEYS[1], -rpm, -rpm, 'WITHSCORES')
    return {1, tonumber(oldest[2]) + 60000 - now}
  end
end
local quotas = {{KEYS[2], ARGV[3], ARGV[5], ARGV[7], 2}, {KEYS[3], ARGV[4], ARGV[6], ARGV[8], 3}}
for _, q in ipairs(quotas) do
  local limit = tonumber(q[2])
  if limit > 0 then
    redis.call('SET', q[1], q[3], 'NX', 'EX', q[4])
    if tonumber(redis.call('GET', q[1])) >= limit then
      return {q[5], 0}
    end
  end
end
if rpm > 0 then
  redis.call('ZADD', KEYS[1], now, ARGV[2])
  redis.call('PEXPIRE', KEYS[1], 60000)
end
return {0, 0}
"""


def counter_names(key_id: int, now: float) -> tuple[str, str, str]:
    """The rpm set and this UTC day's and month's counters of a key (one
    hash tag: one slot of a Redis Cluster)."""
    base = f"{KEY_PREFIX}{{{key_id}}}"
    year, month = utc_month(now)
    return f"{base}:rpm", f"{base}:day:{utc_day(now)}", f"{base}:month:{year}-{month:02d}"


def ttls(now: float) -> tuple[int, int]:
    """Seconds the day's and the month's counters live."""
    return (math.ceil((utc_day(now) + 1) * DAY - now) + MARGIN,
            math.ceil(next_month(now) - now) + MARGIN)


class SharedKeyLimits:
    """KeyService's hook for the limits of keys that have some (see above)."""

    def __init__(self, cluster: Any, limits: Limits,
                 totals: Callable[[], tuple[dict, dict, float]] | None = None,
                 seed: Callable[[dict, dict, float], None] | None = None) -> None:
        self.cluster = cluster
        self.limits = limits          # the local counters: fallback and seeds
        self.totals = totals          # the usage table's tokens of today and this month
        self.seed = seed              # ... given to the local counters
        self._connected = True   # the usage table was read at start
        self._reseeding: asyncio.Future | None = None
        self.redis = cluster.redis
        self._admit = self.redis.register_script(ADMIT)
        self._ids = itertools.count()
        self._counting: set[asyncio.Future] = set()
        self._releasing: dict[int, set[asyncio.Future]] = {}   # leases being given back
        self.local_admissions = 0     # decided locally (Redis unreachable)

    @staticmethod
    def lease(key: Key) -> str:
        return f"key:{key.id}"

    async def admit(self, key: Key, now: float) -> None:
        """Count a request against its key cluster-wide, or LimitExceeded
        (nothing counted)."""
        cluster = self.cluster
        await self._current()
        if cluster.connected:
            try:
                await self._admit_shared(key, now)
            except (RedisError, OSError) as exc:
                cluster.lost(exc)
                await self._current()
            else:
                self.limits.record(key, now)
                return
        self.limits.admit(key, now)   # LimitExceeded: nothing counted
        if key.max_concurrent is not None:
            cluster.leases.hold_locally(self.lease(key))
        self.local_admissions += 1

    async def _admit_shared(self, key: Key, now: float) -> None:
        leases = self.cluster.leases
        leased = False
        if key.max_concurrent is not None:
            pending = self._releasing.get(key.id)
            if pending:
                await asyncio.wait(set(pending), timeout=WAIT)
            if not await leases.acquire(self.lease(key), key.max_concurrent):
                raise over_concurrent(key)
            leased = True
        if key.rpm is None and key.daily_tokens is None and key.monthly_tokens is None:
            return
        try:
            code, wait_ms = await self._admit(keys=list(counter_names(key.id, now)),
                                              args=self._args(key, now))
        except BaseException:
            if leased:
                leases.release(self.lease(key))
            raise
        if code == 0:
            return
        if leased:
            leases.release(self.lease(key))
        if code == 1:
            raise over_rpm(key, int(wait_ms) / 1000)
        raise over_daily(key, now) if code == 2 else over_monthly(key, now)

    def _args(self, key: Key, now: float) -> list[Any]:
        use = self.limits.use(key.id)
        use.roll(now)
        day_ttl, month_ttl = ttls(now)
        return [key.rpm or 0, f"{self.cluster.name}:{next(self._ids)}",
                key.daily_tokens or 0, key.monthly_tokens or 0,
                use.day_tokens, use.month_tokens, day_ttl, month_ttl]

    def done(self, key: Key) -> None:
        """The request is over: its lease, if it took one, goes back. Told to
        Redis in the background, but this instance's next admission of the
        key waits for it: a client that sends its next request once the last
        one is answered is not refused by its own finished request."""
        told = self.cluster.leases.release(self.lease(key))
        if told is None:
            return
        pending = self._releasing.setdefault(key.id, set())
        pending.add(told)

        def forgotten(future: asyncio.Future) -> None:
            pending.discard(future)
            if not pending and self._releasing.get(key.id) is pending:
                del self._releasing[key.id]

        told.add_done_callback(forgotten)

    def add_tokens(self, key: Key, tokens: int, now: float) -> None:
        """Count what a request used (before the local counters do: what they
        hold seeds a counter Redis lost). In the background; a failure loses
        the count in Redis only."""
        if key.daily_tokens is None and key.monthly_tokens is None:
            return
        if not self.cluster.connected:
            return
        use = self.limits.use(key.id)
        use.roll(now)
        _, day, month = counter_names(key.id, now)
        day_ttl, month_ttl = ttls(now)
        counters = ((day, use.day_tokens, day_ttl), (month, use.month_tokens, month_ttl))

        async def send() -> None:
            try:
                async with self.redis.pipeline(transaction=True) as pipe:
                    for name, seed, ttl in counters:
                        pipe.set(name, seed, nx=True, ex=ttl)
                        pipe.incrby(name, tokens)
                    await pipe.execute()
            except (RedisError, OSError) as exc:
                self.cluster.lost(exc)

        task = asyncio.ensure_future(send())
        self._counting.add(task)
        task.add_done_callback(self._counting.discard)

    async def _current(self) -> None:
        """Redis lost or back: read the token counts again from the usage
        table before deciding (the local counters decide alone now, or seed
        the counters a restarted Redis lost). Once per change; requests
        meanwhile wait for it, at most WAIT."""
        connected = self.cluster.connected
        if connected != self._connected:
            self._connected = connected
            if self.totals is not None and self.seed is not None:
                self._reseeding = asyncio.ensure_future(self._reseed())
        reseeding = self._reseeding
        if reseeding is not None:
            if reseeding.done():
                self._reseeding = None
            else:
                await asyncio.wait({reseeding}, timeout=WAIT)

    async def _reseed(self) -> None:
        try:
            totals = await store.run(self.totals)
        except Exception as exc:  # the store unreachable: the counters stay as they are
            log.warning("could not read the token usage again: %s", exc)
            return
        if self.seed is not None:
            self.seed(*totals)
