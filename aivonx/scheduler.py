"""Node capacity and the wait queue in front of it.

Each node takes `slots` requests at once. When every node that could serve
a request is full, the request waits in one bounded FIFO queue; a slot that
frees goes to the oldest waiter that can use that node. A full queue or a
wait past the limit is answered 503 with Retry-After, rather than piling
work onto nodes that would queue it themselves.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any, Hashable
from dataclasses import dataclass, field

from .prefix import RoutingHint
from .registry import NodeState, Registry
from .router import Router, Unroutable


# Seconds between looks for a slot another instance freed (shared slots).
# Instances announce freed slots to those waiting (aivonx.cluster.wakeups),
# so this only catches what no announcement covers: a lost message, the
# leases of an instance that died lapsing.
POLL = 0.5


class QueueFull(Unroutable, RuntimeError):
    pass


class QueueTimeout(Unroutable, RuntimeError):
    pass


@dataclass(eq=False)
class Slot:
    """A node slot held by one request; `ok` says how the request went."""
    node: NodeState
    waited: float = 0.0
    ok: bool = True
    route: str = ""  # why the router chose the node (X-Aivonx-Route)
    cached: Any = None  # the node's cache slot the router pictures it using


@dataclass(eq=False)
class Waiter:
    key: str
    exclude: frozenset[int]
    future: asyncio.Future
    owner: Hashable = None        # whose request: an inference key's id
    since: float = field(default_factory=time.monotonic)
    hint: RoutingHint | None = None


class Scheduler:
    def __init__(self, registry: Registry, router: Router, *, max_queue: int,
                 max_wait: float) -> None:
        self.registry = registry
        self.router = router
        self.max_queue = max_queue
        self.max_wait = max_wait
        # One FIFO per owner; the dict's order is the round-robin order,
        # its first owner is served next. `turns` counts what the first
        # owner may still take before it moves to the back.
        self.queues: dict[Hashable, deque[Waiter]] = {}
        self.priorities: dict[Hashable, int] = {}
        self.turns: dict[Hashable, int] = {}
        self._depth = 0
        self.queued_total = 0
        self.rejected_total = 0
        self.wait_seconds_total = 0.0
        self.max_depth_seen = 0
        # With Redis (aivonx.cluster.SharedSlots): a slot reserved here must
        # also be leased cluster-wide. None: local counting only, no await.
        self.shared: Any = None
        self._poller: asyncio.Future | None = None

    @property
    def depth(self) -> int:
        return self._depth

    @property
    def waiters(self) -> list[Waiter]:
        """Every waiting request, oldest first (for display)."""
        return sorted((w for q in self.queues.values() for w in q), key=lambda w: w.since)

    def oldest_wait(self) -> float | None:
        """Seconds the longest-waiting request has waited so far."""
        if not self.queues:
            return None
        return time.monotonic() - min(q[0].since for q in self.queues.values())

    def _enqueue(self, waiter: Waiter, priority: int) -> None:
        queue = self.queues.get(waiter.owner)
        if queue is None:
            queue = self.queues[waiter.owner] = deque()
            self.turns[waiter.owner] = priority
        self.priorities[waiter.owner] = priority
        queue.append(waiter)
        self._depth += 1

    def _requeue(self, waiter: Waiter) -> None:
        """Back at the head of its owner's queue: a waiter whose slot the
        cluster refused keeps its turn."""
        queue = self.queues.get(waiter.owner)
        if queue is None:
            queue = self.queues[waiter.owner] = deque()
            self.turns[waiter.owner] = self.priorities[waiter.owner] = 1
        queue.appendleft(waiter)
        self._depth += 1

    def _dequeue(self, waiter: Waiter) -> bool:
        queue = self.queues.get(waiter.owner)
        if queue is None or waiter not in queue:
            return False
        queue.remove(waiter)
        self._depth -= 1
        if not queue:
            self._forget(waiter.owner)
        return True

    def _forget(self, owner: Hashable) -> None:
        del self.queues[owner]
        self.turns.pop(owner, None)
        self.priorities.pop(owner, None)

    def _served(self, owner: Hashable) -> None:
        """The owner took a turn: after its last one it goes to the back."""
        if owner not in self.queues:
            return
        self.turns[owner] -= 1
        if self.turns[owner] <= 0:
            queue = self.queues.pop(owner)
            self.queues[owner] = queue
            self.turns[owner] = self.priorities.get(owner, 1)

    def _free_node(self, key: str, exclude: frozenset[int] | set[int],
                   eligible: list[NodeState] | None = None,
                   hint: RoutingHint | None = None) -> NodeState | None:
        """The best node for `key` with a free slot, or None when all are
        full. Raises the router's NoSuchModel / NoHealthyNode."""
        if eligible is None:
            eligible = self.router.eligible(key)
        if not any(n.has_free_slot and n.id not in exclude for n in eligible):
            return None
        for node in self.router.candidates(key, eligible, hint):
            if node.id not in exclude and node.has_free_slot:
                return node
        return None

    async def acquire(self, key: str, exclude: set[int] = frozenset(),
                      abandoned: asyncio.Future | None = None,
                      hint: RoutingHint | None = None, owner: Hashable = None,
                      priority: int = 1) -> NodeState | None:
        """A node with a slot reserved for this request. None when every node
        that has the model was tried already (`exclude`), or when the client
        left (`abandoned` done) while waiting. `owner` (an inference key)
        and its `priority` decide the request's turn in the queue."""
        eligible = self.router.eligible(key)
        if all(n.id in exclude for n in eligible):
            return None
        if self.shared is None:
            node = self._free_node(key, exclude, eligible, hint)
            if node is not None:
                self.registry.begin(node)
                return node
        else:
            node = await self._lease_any(key, exclude, eligible, hint)
            if node is not None:
                return node
        if self._depth >= self.max_queue:
            self.rejected_total += 1
            raise QueueFull(f"all nodes are busy and {self.max_queue} requests are waiting")
        loop = asyncio.get_running_loop()
        waiter = Waiter(key, frozenset(exclude), loop.create_future(), owner, hint=hint)
        self._enqueue(waiter, max(1, priority))
        self.queued_total += 1
        self.max_depth_seen = max(self.max_depth_seen, self._depth)
        if self.shared is not None:
            self._poll()
        deadline = waiter.since + self.max_wait
        served: NodeState | None = None
        try:
            while True:
                waits = {waiter.future} if abandoned is None else {waiter.future, abandoned}
                await asyncio.wait(waits, timeout=max(0.0, deadline - time.monotonic()),
                                   return_when=asyncio.FIRST_COMPLETED)
                if waiter.future.done() and not (abandoned is not None and abandoned.done()):
                    node = waiter.future.result()
                    if self.shared is None:
                        served = node
                        return served
                    # The reservation is this call's now; the lease decides.
                    waiter.future = loop.create_future()
                    if await self._lease(node):
                        if abandoned is not None and abandoned.done():
                            self.shared.give_back(node)
                            self.release(node, ok=True, counted=False)
                            return None
                        served = node
                        return served
                    self._requeue(waiter)
                    self._poll()
                    continue
                if abandoned is not None and abandoned.done():
                    return None
                self.rejected_total += 1
                raise QueueTimeout(f"all nodes stayed busy for {self.max_wait:g} s")
        finally:
            self.wait_seconds_total += time.monotonic() - waiter.since
            if served is None:
                self._abandon(waiter)

    # -- shared slots (Redis) ------------------------------------------------------
    async def _lease_any(self, key: str, exclude: frozenset[int] | set[int],
                         eligible: list[NodeState],
                         hint: RoutingHint | None = None) -> NodeState | None:
        """The best node whose slot is free here and leased cluster-wide."""
        for node in self.router.candidates(key, eligible, hint):
            if node.id not in exclude and node.has_free_slot:
                self.registry.begin(node)
                if await self._lease(node):
                    return node
        return None

    async def _lease(self, node: NodeState) -> bool:
        """Lease the slot reserved on `node`; a refused one is unreserved."""
        try:
            taken = await self.shared.take(node)
        except BaseException:
            self.registry.unreserve(node)
            raise
        if not taken:
            self.registry.unreserve(node)
        return taken

    def _poll(self) -> None:
        """Slots freed by other instances raise no local event: while
        requests wait for a cluster-wide slot, look again every POLL s."""
        if self._poller is None or self._poller.done():
            self._poller = asyncio.ensure_future(self._poll_while_waiting())

    async def _poll_while_waiting(self) -> None:
        while self._depth:
            await asyncio.sleep(POLL)
            self.dispatch()

    def slot(self, key: str, exclude: set[int],
             abandoned: asyncio.Future | None = None,
             hint: RoutingHint | None = None, owner: Hashable = None,
             priority: int = 1) -> "SlotHold":
        """Hold a slot of the best free node for `key` (waiting in the queue
        if all are busy) for the duration of an `async with` block, and free
        it after. Yields None when every node was tried or the client left;
        raises Unroutable as acquire does."""
        return SlotHold(self, key, exclude, abandoned, hint, owner, priority)

    def _abandon(self, waiter: Waiter) -> None:
        """The waiter leaves unserved; a slot reserved for it in the meantime
        goes to the next one."""
        self._dequeue(waiter)
        if waiter.future.done():
            self.release(waiter.future.result(), ok=True, counted=False)
        else:
            waiter.future.cancel()

    def release(self, node: NodeState, ok: bool, counted: bool = True) -> None:
        """A request left the node: free its slot for the oldest waiter."""
        if counted:
            self.registry.end(node, ok)
            if self.shared is not None:
                self.shared.give_back(node)
        else:
            self.registry.unreserve(node)
        self.dispatch()

    def dispatch(self) -> None:
        """Hand free slots to waiters: to the owners in round-robin order,
        each owner's oldest request that a free node can serve. Called
        whenever capacity may have appeared: a request ended, a node came
        back or changed."""
        while self._depth:
            if not self._dispatch_one():
                return

    def _dispatch_one(self) -> bool:
        """Serve one waiter of the first owner that has a servable one."""
        for owner, queue in self.queues.items():
            for waiter in queue:
                try:
                    node = self._free_node(waiter.key, waiter.exclude, hint=waiter.hint)
                except Unroutable:
                    continue  # its model is gone or down for now: it keeps waiting
                if node is None:
                    continue
                self.registry.begin(node)
                self._dequeue(waiter)
                self._served(owner)
                waiter.future.set_result(node)
                return True
        return False


class SlotHold:
    """The `async with` of Scheduler.slot, as a plain class: a generator-based
    context manager costs an async generator, its frames and two awaits per
    request on the hot path."""

    __slots__ = ("scheduler", "key", "exclude", "abandoned", "hint", "owner", "priority",
                 "held")

    def __init__(self, scheduler: Scheduler, key: str, exclude: set[int],
                 abandoned: asyncio.Future | None, hint: RoutingHint | None,
                 owner: Hashable, priority: int) -> None:
        self.scheduler = scheduler
        self.key = key
        self.exclude = exclude
        self.abandoned = abandoned
        self.hint = hint
        self.owner = owner
        self.priority = priority
        self.held: Slot | None = None

    async def __aenter__(self) -> Slot | None:
        scheduler = self.scheduler
        asked = time.monotonic()
        node = await scheduler.acquire(self.key, self.exclude, self.abandoned, self.hint,
                                       self.owner, self.priority)
        if node is None:
            return None
        route, cached = scheduler.router.chosen(node, self.key, self.hint)
        self.held = Slot(node, waited=time.monotonic() - asked, route=route, cached=cached)
        return self.held

    async def __aexit__(self, *exc_info: object) -> None:
        held, self.held = self.held, None
        if held is not None:
            try:
                self.scheduler.router.prefixes.release(held.cached)
            finally:
                self.scheduler.release(held.node, held.ok)
