"""The cluster service: one Redis client, the heartbeat that says this
instance is alive (and refreshes its leases), the channel that carries admin
changes, and the scheduler's hook for shared node slots."""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, Callable

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from .. import store
from ..registry import NodeState
from . import keysync
from .health import LIVE, MAX_MESSAGE
from .leases import Leases

log = logging.getLogger("aivonx.cluster")

HEARTBEAT = 1.0          # seconds between heartbeats (and lease refreshes)
INSTANCE_TTL_MS = 3000   # an instance not heard of for this long is gone
SOCKET_TIMEOUT = 0.5     # a Redis that does not answer within this is unreachable
INSTANCE_PREFIX = "aivonx:instance:"
CHANNEL = "aivonx:changes"


class Cluster:
    """This instance's membership of the cluster. `connected` says whether
    Redis answers; every Redis call goes through `lost` when it fails."""

    def __init__(self, url: str, name: str, nodes: Any, keep_alive: Any) -> None:
        self.url = url
        self.name = name
        self.nodes = nodes            # NodeService: applies changes from other instances
        self.keep_alive = keep_alive  # KeepAlivePolicy
        self.keys: Any = None         # KeyService: key changes from other instances
        self.redis = aioredis.Redis.from_url(
            url, socket_timeout=SOCKET_TIMEOUT, socket_connect_timeout=SOCKET_TIMEOUT,
            # One retry, on a new connection: after a Redis restart the pool's
            # idle connections are dead, and each would otherwise fail once.
            retry=Retry(NoBackoff(), 1), client_name=f"aivonx {name}"[:64].replace(" ", "-"))
        self.leases = Leases(self.redis, name)
        self.connected = False
        self.since = time.time()
        self.instances: list[str] = [name]   # alive at the last heartbeat, this one included
        self.outages = 0
        self.changes_applied = 0
        self._tasks: list[asyncio.Future] = []
        self._publishing: set[asyncio.Future] = set()
        # Live news on LIVE (node health, slot wake-ups), by message kind.
        self.live_handlers: dict[str, Callable[[dict[str, Any]], None]] = {}

    # -- state ------------------------------------------------------------------
    def lost(self, exc: BaseException) -> None:
        """Redis failed a call: serve on local counters until it answers."""
        if self.connected:
            self.connected = False
            self.since = time.time()
            self.outages += 1
            log.warning("Redis at %s is unreachable (%s): serving with local counters, each "
                        "instance its share of every node's slots", self.url, exc)

    def _back(self) -> None:
        if not self.connected:
            self.connected = True
            self.since = time.time()
            log.info("Redis at %s answers: node slots are counted cluster-wide", self.url)

    def view(self) -> dict[str, Any]:
        """What the state API shows about the cluster."""
        return {"redis": "connected" if self.connected else "unreachable",
                "shared_slots": self.connected, "since": self.since,
                "instances": list(self.instances)}

    # -- life -------------------------------------------------------------------
    async def start(self) -> None:
        await self._heartbeat()
        self._tasks = [asyncio.ensure_future(self._beat_forever()),
                       asyncio.ensure_future(self._listen_forever())]

    def stop(self) -> asyncio.Future:
        """Leave the cluster: stop the loops, then say so and close the
        connections (the future returned; awaiting it is optional)."""
        for task in self._tasks:
            task.cancel()
        self._tasks = []
        return asyncio.ensure_future(self._close())

    async def _close(self) -> None:
        try:
            await asyncio.wait_for(self.redis.delete(INSTANCE_PREFIX + self.name), SOCKET_TIMEOUT)
        except (RedisError, OSError, asyncio.TimeoutError):
            pass
        await asyncio.gather(*self._publishing, return_exceptions=True)
        await self.redis.aclose()

    async def _beat_forever(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT)
            await self._heartbeat()

    async def _heartbeat(self) -> None:
        """Say this instance is alive, see who else is, refresh leases."""
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.set(INSTANCE_PREFIX + self.name, json.dumps({"started": self.since}),
                         px=INSTANCE_TTL_MS)
                await pipe.execute()
            names = [key.decode()[len(INSTANCE_PREFIX):] async for key in
                     self.redis.scan_iter(match=INSTANCE_PREFIX + "*", count=100)]
            await self.leases.refresh()
        except (RedisError, OSError) as exc:
            self.lost(exc)
            return
        self.instances = sorted(set(names) | {self.name})
        self._back()

    # -- changes ----------------------------------------------------------------
    def publish(self, kind: str, key: int | None) -> None:
        """Tell the other instances an admin change was stored (in the
        background: the change is saved whatever Redis does)."""
        message = json.dumps({"from": self.name, "kind": kind, "id": key})

        async def send() -> None:
            try:
                await self.redis.publish(CHANNEL, message)
            except (RedisError, OSError) as exc:
                self.lost(exc)  # the others reload everything once they hear again

        task = asyncio.ensure_future(send())
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)

    async def _listen_forever(self) -> None:
        first = True
        while True:
            try:
                async with self.redis.pubsub() as pubsub:
                    await pubsub.subscribe(CHANNEL, LIVE)
                    if not first:
                        await self._reload_all()  # changes sent while we were not listening
                    first = False
                    while True:
                        message = await pubsub.get_message(ignore_subscribe_messages=True,
                                                           timeout=1.0)
                        if message is None:
                            continue
                        if message.get("channel") == LIVE.encode():
                            self._apply_live(message.get("data"))
                        else:
                            await self._apply(message.get("data"))
            except (RedisError, OSError) as exc:
                self.lost(exc)
                await asyncio.sleep(HEARTBEAT / 2)

    async def _apply(self, data: Any) -> None:
        try:
            change = json.loads(data)
            kind, key, sender = change["kind"], change.get("id"), change.get("from")
        except (ValueError, TypeError, KeyError):
            return
        if sender == self.name:
            return
        try:
            if kind == "node" and isinstance(key, int):
                row = await store.run(store.Node.get_or_none, store.Node.id == key)
                self.nodes.apply_stored(key, row)
            elif kind == "strategy":
                self.nodes.apply_strategy(await store.run(store.get_config, "strategy"))
            elif kind == "cache_load_factor":
                self.nodes.apply_load_factor(await store.run(store.get_config, kind))
            elif kind == "keep_alive":
                self.keep_alive.load(await store.run(store.get_config, "keep_alive"))
            elif kind in keysync.KINDS and self.keys is not None:
                await keysync.apply(self.keys, kind, key)
            else:
                return
        except Exception as exc:  # the store unreachable: the next full reload catches up
            log.warning("could not apply a %s change from instance %s: %s", kind, sender, exc)
            return
        self.changes_applied += 1

    def publish_live(self, message: str) -> None:
        """Send live news (already encoded) to the other instances, in the
        background; lost when Redis is unreachable, like the news itself."""
        async def send() -> None:
            try:
                await self.redis.publish(LIVE, message)
            except (RedisError, OSError) as exc:
                self.lost(exc)

        task = asyncio.ensure_future(send())
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)

    def _apply_live(self, data: Any) -> None:
        if not isinstance(data, (bytes, str)) or len(data) > MAX_MESSAGE:
            return
        try:
            change = json.loads(data)
        except ValueError:
            return
        if not isinstance(change, dict) or change.get("from") == self.name:
            return
        handler = self.live_handlers.get(change.get("kind"))
        if handler is None:
            return
        try:
            handler(change)
        except Exception:  # one bad message must not stop the listener
            log.exception("could not apply a %s message", change.get("kind"))

    async def _reload_all(self) -> None:
        try:
            rows = await store.run(lambda: list(store.Node.select()))
            strategy = await store.run(store.get_config, "strategy")
            keep_alive = await store.run(store.get_config, "keep_alive")
            factor = await store.run(store.get_config, "cache_load_factor")
        except Exception as exc:
            log.warning("could not reload the configuration: %s", exc)
            return
        self.nodes.apply_all(rows, strategy)
        self.nodes.apply_load_factor(factor)
        self.keep_alive.load(keep_alive)
        if self.keys is not None:
            try:
                await keysync.reload_all(self.keys)
            except Exception as exc:
                log.warning("could not reload the keys: %s", exc)


class SharedSlots:
    """The scheduler's hook: a node slot held is also a lease in Redis, so
    the requests in flight on a node, over every instance, never exceed its
    slots. Without Redis, this instance takes its share of them."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.local_grants = 0   # slots granted on the local share (Redis unreachable)
        self.wakeups: Any = None  # aivonx.cluster.wakeups.SlotWakeups, when wired

    def share(self, node: NodeState) -> int:
        return max(1, node.slots // max(1, len(self.cluster.instances)))

    async def take(self, node: NodeState) -> bool:
        """Whether the request may use the slot it reserved locally on `node`
        (node.active_requests counts it already)."""
        key = f"slots:{node.id}"
        cluster = self.cluster
        if cluster.connected:
            try:
                taken = await cluster.leases.acquire(key, node.slots)
            except (RedisError, OSError) as exc:
                cluster.lost(exc)
            else:
                if not taken and self.wakeups is not None:
                    self.wakeups.refused(node.id)
                return taken
        if node.active_requests > self.share(node):
            return False
        cluster.leases.hold_locally(key)
        self.local_grants += 1
        return True

    def give_back(self, node: NodeState) -> None:
        given = self.cluster.leases.release(f"slots:{node.id}")
        if self.wakeups is not None and self.cluster.connected:
            self.wakeups.released(node.id, given)
