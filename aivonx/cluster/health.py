"""Node health and model lists shared by every instance.

When this instance sees a node go down, come back, open its breaker, rest
after 429/503 or change its model lists, it tells the others on LIVE, so
they all stop sending to a failing node together and route by the same
model lists. Each instance keeps probing: a later local observation still
decides, and only local observations are sent (no echo between instances).
A message from another instance is input: everything in it is checked and
bounded before it reaches the registry.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from typing import Any, Callable

from ..registry import NodeState, Registry

log = logging.getLogger("aivonx.cluster")

LIVE = "aivonx:live"          # health changes and slot wake-ups (not admin changes)
MAX_MESSAGE = 256 * 1024      # bytes; larger messages are dropped unread
MAX_MODELS = 1000             # names per list in one message
MAX_NAME = 300                # characters per model name
MAX_REASON = 300
MAX_SECONDS = 3600.0          # longest rest another instance can impose


def _names(entries: list[dict[str, Any]] | dict[str, str]) -> list[str]:
    if isinstance(entries, dict):
        names = list(entries.values())
    else:
        names = [e.get("model") or e.get("name") for e in entries]
    return [n for n in names if isinstance(n, str) and len(n) <= MAX_NAME][:MAX_MODELS]


def encode(sender: str, state: NodeState) -> str:
    """The node's health and model lists, as this instance sees them now."""
    now = time.monotonic()
    return json.dumps({
        "from": sender, "kind": "health", "node": state.id, "url": state.url,
        "healthy": state.healthy, "reason": state.reason[:MAX_REASON],
        "breaker_for": round(max(0.0, state.breaker.until - now), 3),
        "rest_for": round(max(0.0, state.cooldown_until - now), 3),
        "models": _names(state.models), "loaded": _names(state.loaded)})


def _seconds(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if not math.isfinite(value) or value < 0:
        return None
    return min(float(value), MAX_SECONDS)


def _name_list(value: Any) -> list[str] | None:
    if not isinstance(value, list) or len(value) > MAX_MODELS:
        return None
    if not all(isinstance(n, str) and 0 < len(n) <= MAX_NAME for n in value):
        return None
    return value


def decode(change: dict[str, Any]) -> dict[str, Any] | None:
    """The checked fields of a health message, or None when any is wrong."""
    node, url, healthy, reason = (change.get(k) for k in ("node", "url", "healthy", "reason"))
    if isinstance(node, bool) or not isinstance(node, int) or not isinstance(url, str):
        return None
    if not isinstance(healthy, bool) or not isinstance(reason, str):
        return None
    breaker_for, rest_for = _seconds(change.get("breaker_for")), _seconds(change.get("rest_for"))
    models, loaded = _name_list(change.get("models")), _name_list(change.get("loaded"))
    if None in (breaker_for, rest_for, models, loaded):
        return None
    printable = "".join(c for c in reason[:MAX_REASON] if c.isprintable())
    return {"node": node, "url": url, "healthy": healthy, "reason": printable,
            "breaker_for": breaker_for, "rest_for": rest_for, "models": models,
            "loaded": loaded}


class SharedHealth:
    """Sends this instance's observations of nodes, applies the others'.

    Observations are coalesced per node within one turn of the event loop
    (a failed request marks a node down and counts a breaker failure: one
    message)."""

    def __init__(self, cluster: Any, registry: Registry,
                 applied: Callable[[], None]) -> None:
        self.cluster = cluster
        self.registry = registry
        self.applied = applied      # the scheduler's dispatch: a node back may serve waiters
        self.sent = 0
        self.received = 0
        self._pending: set[int] = set()
        registry.observed = self.observed

    def observed(self, state: NodeState) -> None:
        if not self._pending:
            asyncio.get_event_loop().call_soon(self._flush)
        self._pending.add(state.id)

    def _flush(self) -> None:
        pending, self._pending = self._pending, set()
        if not self.cluster.connected:
            return  # the others find out by probing; no queue of stale news
        for node_id in pending:
            state = self.registry.nodes.get(node_id)
            if state is not None:
                self.cluster.publish_live(encode(self.cluster.name, state))
                self.sent += 1

    def apply(self, change: dict[str, Any]) -> None:
        fields = decode(change)
        if fields is None:
            log.debug("ignored a malformed health message from %r", change.get("from"))
            return
        state = self.registry.nodes.get(fields["node"])
        if state is None or state.url != fields["url"]:
            return  # unknown here, or the id names another machine now
        self.registry.apply_shared(state, fields["healthy"], fields["reason"],
                                   fields["breaker_for"], fields["rest_for"],
                                   fields["models"], fields["loaded"])
        self.received += 1
        if state.routable:
            self.applied()
