"""Live node state: the in-memory truth that routing reads.

Nothing here touches the database or the network; the monitor and the relay
report what they observe, the management API reports what admins change.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable

from . import modelnames
from .nodeaddr import base_url

LATENCY_SMOOTHING = 0.3  # weight of a new sample in the moving average


@dataclass
class NodeState:
    id: int
    name: str
    address: str
    port: int
    enabled: bool = True          # the admin's switch; False = drained
    healthy: bool = False         # last probe or request outcome
    since: float = field(default_factory=time.time)  # when `status` last changed
    reason: str = "not probed yet"
    latency: float | None = None  # smoothed seconds for GET /
    last_latency: float | None = None
    latency_history: list[float] = field(default_factory=list)
    version: str | None = None
    models: dict[str, str] = field(default_factory=dict)   # canonical -> display name
    tags: list[dict[str, Any]] = field(default_factory=list)  # raw /api/tags entries
    loaded: list[dict[str, Any]] = field(default_factory=list)  # raw /api/ps entries
    active_requests: int = 0
    requests_served: int = 0
    errors: int = 0

    @property
    def url(self) -> str:
        return base_url(self.address, self.port)

    @property
    def routable(self) -> bool:
        return self.enabled and self.healthy

    @property
    def status(self) -> str:
        if not self.enabled:
            return "drained"
        return "active" if self.healthy else "standby"

    def has_model(self, key: str) -> bool:
        return key in self.models

    def loaded_keys(self) -> set[str]:
        keys = set()
        for entry in self.loaded:
            name = entry.get("model") or entry.get("name")
            if isinstance(name, str):
                try:
                    keys.add(modelnames.canonical(name))
                except modelnames.InvalidModelName:
                    pass
        return keys


HISTORY_LENGTH = 30


class Registry:
    """Per-node live state plus the counters the status views show."""

    def __init__(self) -> None:
        self.nodes: dict[int, NodeState] = {}
        self.requests_served = 0
        self.errors = 0

    # -- membership (from the store / management API) -----------------------
    def upsert(self, node_id: int, name: str, address: str, port: int,
               enabled: bool, models: Iterable[str] = ()) -> NodeState:
        state = self.nodes.get(node_id)
        if state is None:
            state = NodeState(id=node_id, name=name, address=address, port=port,
                              enabled=enabled)
            self.nodes[node_id] = state
            self.set_models(state, models)
            return state
        moved = (state.address, state.port) != (address, port)
        state.name = name
        state.address, state.port = address, port
        if moved:
            # A different machine: what we knew about the old one is void.
            state.healthy = False
            state.reason = "address changed, not probed yet"
            state.since = time.time()
            state.latency = state.last_latency = None
            state.latency_history.clear()
            state.loaded = []
        self.set_enabled(state, enabled)
        return state

    def remove(self, node_id: int) -> None:
        self.nodes.pop(node_id, None)

    def set_enabled(self, state: NodeState, enabled: bool) -> None:
        if state.enabled != enabled:
            state.enabled = enabled
            state.since = time.time()
            state.reason = "drained by admin" if not enabled else state.reason

    # -- observations (from the monitor and the relay) ----------------------
    def mark_up(self, state: NodeState) -> bool:
        """Returns True when the node just came back."""
        changed = not state.healthy
        if changed:
            state.healthy = True
            state.since = time.time()
        state.reason = "ok"
        return changed

    def mark_down(self, state: NodeState, reason: str) -> bool:
        """Returns True when the node just left the active pool."""
        changed = state.healthy
        if changed:
            state.healthy = False
            state.since = time.time()
        state.reason = reason[:300]
        return changed

    def record_latency(self, state: NodeState, seconds: float) -> None:
        state.last_latency = seconds
        if state.latency is None:
            state.latency = seconds
        else:
            state.latency += LATENCY_SMOOTHING * (seconds - state.latency)
        state.latency_history.append(seconds)
        del state.latency_history[:-HISTORY_LENGTH]

    def set_models(self, state: NodeState, names: Iterable[str],
                   tags: list[dict[str, Any]] | None = None) -> None:
        models = {}
        for name in names:
            try:
                models[modelnames.canonical(name)] = name
            except modelnames.InvalidModelName:
                continue
        state.models = models
        if tags is not None:
            state.tags = tags

    def forget_model(self, state: NodeState, key: str) -> None:
        """A node said it lacks a model it listed: stop sending it there until
        the next probe says otherwise."""
        state.models.pop(key, None)

    def begin(self, state: NodeState) -> None:
        state.active_requests += 1

    def end(self, state: NodeState, ok: bool) -> None:
        state.active_requests -= 1
        state.requests_served += 1
        self.requests_served += 1
        if not ok:
            state.errors += 1
            self.errors += 1

    # -- views ---------------------------------------------------------------
    def routable(self) -> list[NodeState]:
        return [n for n in self.nodes.values() if n.routable]

    def total_active(self) -> int:
        return sum(n.active_requests for n in self.nodes.values())
