"""Queue wake-ups across instances: a slot freed on one instance reaches a
request waiting for it on another at once, not at its next poll.

Cheap by construction: an instance whose lease on a node was refused says
"waiting on node N" (at most every NOTICE_EVERY seconds per node); the
others remember it for WANTED_FOR seconds, and only while they do does a
lease they give back on N cost a "freed on N" message. With nobody
waiting, releasing a slot sends nothing.
"""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Callable

NOTICE_EVERY = 0.5   # seconds between "waiting" notices of one node
WANTED_FOR = 2.0     # how long a "waiting" notice makes releases announced


def _node_id(change: dict[str, Any]) -> int | None:
    node = change.get("node")
    return node if isinstance(node, int) and not isinstance(node, bool) else None


class SlotWakeups:
    def __init__(self, cluster: Any, dispatch: Callable[[], None]) -> None:
        self.cluster = cluster
        self.dispatch = dispatch          # the scheduler's: hand free slots to waiters
        self._noticed: dict[int, float] = {}   # node id -> when we last said we wait
        self._wanted: dict[int, float] = {}    # node id -> until when others wait
        self._tasks: set[asyncio.Future] = set()
        self.sent = 0
        self.woken = 0
        cluster.live_handlers["waiting"] = self.waiting_elsewhere
        cluster.live_handlers["freed"] = self.freed_elsewhere

    def _send(self, kind: str, node_id: int) -> None:
        self.cluster.publish_live(json.dumps({"from": self.cluster.name, "kind": kind,
                                              "node": node_id}))
        self.sent += 1

    # -- this instance -------------------------------------------------------------
    def refused(self, node_id: int) -> None:
        """A lease on the node was refused here: a request will wait for it."""
        now = time.monotonic()
        if now - self._noticed.get(node_id, -NOTICE_EVERY) >= NOTICE_EVERY:
            self._noticed[node_id] = now
            self._send("waiting", node_id)

    def released(self, node_id: int, given: asyncio.Future | None = None) -> None:
        """A lease on the node was given back here (`given`: done once Redis
        has it back)."""
        until = self._wanted.get(node_id)
        if until is None:
            return
        if time.monotonic() < until:
            # Told after Redis has the lease back, or the waiter's retry
            # would find the slot still taken.
            if given is not None and not given.done():
                task = asyncio.ensure_future(self._after(given, node_id))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            else:
                self._send("freed", node_id)
        else:
            del self._wanted[node_id]

    async def _after(self, given: asyncio.Future, node_id: int) -> None:
        await asyncio.gather(given, return_exceptions=True)
        self._send("freed", node_id)

    # -- the others ----------------------------------------------------------------
    def waiting_elsewhere(self, change: dict[str, Any]) -> None:
        node_id = _node_id(change)
        if node_id is not None and len(self._wanted) < 10_000:
            self._wanted[node_id] = time.monotonic() + WANTED_FOR

    def freed_elsewhere(self, change: dict[str, Any]) -> None:
        if _node_id(change) is not None:
            self.woken += 1
            self.dispatch()
