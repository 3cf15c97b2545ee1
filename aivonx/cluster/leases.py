"""Counted leases shared by every instance: at most `limit` held at once
per key, across the cluster.

Each key is a sorted set of lease ids scored by their expiry (Redis's own
clock, so instances' clocks do not matter). Taking a lease is one atomic
script: drop the expired, add ours if fewer than `limit` remain. The holder
refreshes its leases while it holds them; an instance killed with -9 stops
refreshing and its leases lapse after LEASE_TTL. Node slots use this; any
other concurrency limit (a key's `max_concurrent`) is another key prefix.

Requests that take or give back leases in the same turn of the event loop
share one pipeline: a Redis command costs this process a few hundred
microseconds of client work, a pipeline of them barely more than one.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
from typing import Any

log = logging.getLogger("aivonx.cluster")

LEASE_TTL_MS = 3000   # a dead instance's leases lapse within this
PREFIX = "aivonx:lease:"

# KEYS[1] the set; ARGV: limit, ttl ms, lease id. 1 when taken.
ACQUIRE = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

# KEYS[1] the set; ARGV: ttl ms, lease ids. Pushes their expiry on, and
# puts back leases a restarted Redis lost (they are still held).
REFRESH = """
local t = redis.call('TIME')
local until_ = t[1] * 1000 + math.floor(t[2] / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], until_, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return #ARGV - 1
"""


class Leases:
    """The leases this instance holds, by key, and the scripts that count
    them in Redis. Calls raise redis's errors; the caller decides what an
    unreachable Redis means."""

    def __init__(self, redis: Any, instance: str, ttl_ms: int = LEASE_TTL_MS) -> None:
        self.redis = redis
        self.instance = instance
        self.ttl_ms = ttl_ms
        self.held: dict[str, list[str]] = {}
        self._acquire = redis.register_script(ACQUIRE)
        self._refresh = redis.register_script(REFRESH)
        self._sending: set[asyncio.Future] = set()
        self._asking: list[tuple[str, int, str, asyncio.Future]] = []
        self._giving: list[tuple[str, str]] = []
        self._given: asyncio.Future | None = None  # done once Redis heard of _giving

    def _new_id(self) -> str:
        return f"{self.instance}:{secrets.token_hex(6)}"

    async def acquire(self, key: str, limit: int) -> bool:
        """Take one lease on `key` if fewer than `limit` are held cluster-wide."""
        lease = self._new_id()
        loop = asyncio.get_running_loop()
        answer = loop.create_future()
        self._asking.append((key, limit, lease, answer))
        if len(self._asking) == 1:
            loop.call_soon(self._background, self._ask)
        taken = await answer
        if taken:
            self.held.setdefault(key, []).append(lease)
        return bool(taken)

    def _background(self, work: Any) -> None:
        task = asyncio.ensure_future(work())
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _ask(self) -> None:
        """Send every acquire of this turn, one round trip for all."""
        asking, self._asking = self._asking, []
        try:
            if len(asking) == 1:
                key, limit, lease, _ = asking[0]
                answers = [await self._acquire(keys=[PREFIX + key],
                                               args=[limit, self.ttl_ms, lease])]
            else:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for key, limit, lease, _ in asking:
                        await self._acquire(keys=[PREFIX + key],
                                            args=[limit, self.ttl_ms, lease], client=pipe)
                    answers = await pipe.execute()
        except BaseException as exc:
            for *_, answer in asking:
                if not answer.done():
                    answer.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (key, _, lease, answer), taken in zip(asking, answers):
            if not answer.done():
                answer.set_result(taken)
            elif taken:  # its request left meanwhile: give the lease back at once
                self._give(key, lease)

    def hold_locally(self, key: str) -> None:
        """A lease granted without Redis (unreachable): counted here, and put
        into Redis by the next refresh once it is back."""
        self.held.setdefault(key, []).append(self._new_id())

    def release(self, key: str) -> asyncio.Future | None:
        """Give back one lease on `key` (they are alike); Redis is told in the
        background (the future returned is done once it was, or failed to
        be), and a lease it never hears of lapses by itself."""
        leases = self.held.get(key)
        if not leases:
            return None
        lease = leases.pop()
        if not leases:
            del self.held[key]
        return self._give(key, lease)

    def _give(self, key: str, lease: str) -> asyncio.Future:
        self._giving.append((key, lease))
        if len(self._giving) == 1:
            loop = asyncio.get_running_loop()
            self._given = loop.create_future()
            loop.call_soon(self._background, self._forget)
        return self._given

    async def _forget(self) -> None:
        """Tell Redis of every lease given back this turn, in one round trip."""
        giving, self._giving = self._giving, []
        given, self._given = self._given, None
        try:
            await self._zrem(giving)
        finally:
            if given is not None and not given.done():
                given.set_result(None)

    async def _zrem(self, giving: list[tuple[str, str]]) -> None:
        by_key: dict[str, list[str]] = {}
        for key, lease in giving:
            by_key.setdefault(key, []).append(lease)
        try:
            if len(by_key) == 1:
                key, ids = next(iter(by_key.items()))
                await self.redis.zrem(PREFIX + key, *ids)
            else:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for key, ids in by_key.items():
                        pipe.zrem(PREFIX + key, *ids)
                    await pipe.execute()
        except Exception as exc:  # unreachable: the leases lapse by themselves
            log.debug("could not release %d leases: %s", len(giving), exc)

    async def refresh(self) -> None:
        """Extend every held lease (one round trip per key)."""
        if not self.held:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for key, leases in list(self.held.items()):
                await self._refresh(keys=[PREFIX + key], args=[self.ttl_ms, *leases],
                                    client=pipe)
            await pipe.execute()

    async def count(self, key: str) -> int:
        """Leases on `key` held now, cluster-wide (for views and tests)."""
        return await self.redis.zcard(PREFIX + key)
