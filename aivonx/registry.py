"""Live node state: the in-memory truth that routing reads.

Nothing here touches the database or the network; the monitor and the relay
report what they observe, the node service reports what admins change. The
registry is the only writer of a NodeState: everything else reads it.
"""
from __future__ import annotations

import functools

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from . import modelnames
from .breaker import FAILURES as BREAKER_FAILURES, Breaker
from .nodeaddr import base_url

LATENCY_SMOOTHING = 0.3  # weight of a new sample in the moving average
DEFAULT_SLOTS = 4         # Ollama's default parallelism where memory allows

# A node answering 429/503 ("server busy") rests this long unless it says
# how long itself (Retry-After), bounded.
BUSY_COOLDOWN = 5.0
BUSY_COOLDOWN_MAX = 60.0
# Slower than this (smoothed probe latency) or failing recently: degraded.
DEGRADED_LATENCY = 1.0
DEGRADED_ERROR_WINDOW = 60.0


@functools.lru_cache(maxsize=1024)
def _printable(name: str) -> str:
    """Computed once per name: every relayed response carries it."""
    return "".join(c for c in name if 32 <= ord(c) < 127).strip()


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
    slots: int = DEFAULT_SLOTS     # parallel requests the node takes before queueing
    weight: float = 1.0            # relative capacity, for unequal hardware
    breaker: Breaker = field(default_factory=Breaker)
    cooldown_until: float = 0.0    # monotonic; resting after 429/503 before this
    last_error_at: float = 0.0     # monotonic time of the last failed request
    probe_failures: int = 0        # consecutive failed probes
    next_probe_at: float = 0.0     # monotonic; probe backoff for unhealthy nodes

    @property
    def url(self) -> str:
        return base_url(self.address, self.port)

    @property
    def header_name(self) -> str:
        """The name as a response header value may carry it (printable ASCII)."""
        return _printable(self.name) or str(self.id)

    def resting(self, now: float | None = None) -> bool:
        """Open circuit or busy cooldown: healthy, but not taking requests."""
        now = time.monotonic() if now is None else now
        return self.breaker.is_open(now) or now < self.cooldown_until

    @property
    def routable(self) -> bool:
        return self.enabled and self.healthy and not self.resting()

    @property
    def status(self) -> str:
        """The pool: active (routable), standby, or drained by the admin."""
        if not self.enabled:
            return "drained"
        return "active" if self.routable else "standby"

    @property
    def health(self) -> str:
        """healthy, degraded (slow, erroring, resting), unhealthy
        (unreachable) or drained (admin)."""
        if not self.enabled:
            return "drained"
        if not self.healthy:
            return "unhealthy"
        return "degraded" if self._degraded_because() else "healthy"

    @property
    def health_reason(self) -> str:
        """Why the node is not healthy, in a few words; empty when it is."""
        if not self.enabled:
            return self.reason if self.reason not in ("ok", "") else "drained by admin"
        if not self.healthy:
            return self.reason
        return self._degraded_because() or ""

    def _degraded_because(self) -> str | None:
        now = time.monotonic()
        if self.resting(now):
            return self.reason or "resting"  # says why it rests and for how long
        if self.last_error_at and now - self.last_error_at < DEGRADED_ERROR_WINDOW:
            return f"a request failed {now - self.last_error_at:.0f} s ago"
        if self.latency is not None and self.latency > DEGRADED_LATENCY:
            return f"slow: probes take {self.latency:.2f} s"
        return None

    @property
    def has_free_slot(self) -> bool:
        return self.active_requests < self.slots

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
        # Told when a node's KV caches are gone: for some models (unloaded
        # there) or all of them (None: it restarted, moved or was removed).
        self.caches_lost: Callable[[int, Iterable[str] | None], Any] | None = None
        # Told when this instance observed a change of a node's health or
        # model lists (aivonx.cluster.health shares it); not for changes
        # applied from other instances, so nothing echoes back.
        self.observed: Callable[[NodeState], Any] | None = None

    def _observed(self, state: NodeState) -> None:
        if self.observed is not None:
            self.observed(state)

    def _caches_lost(self, state: NodeState, models: Iterable[str] | None = None) -> None:
        if self.caches_lost is not None:
            self.caches_lost(state.id, models)

    # -- membership (from the store / management API) -----------------------
    def upsert(self, node_id: int, name: str, address: str, port: int,
               enabled: bool, models: Iterable[str] = (), *, slots: int = DEFAULT_SLOTS,
               weight: float = 1.0) -> NodeState:
        state = self.nodes.get(node_id)
        if state is None:
            state = NodeState(id=node_id, name=name, address=address, port=port,
                              enabled=enabled, slots=slots, weight=weight)
            self.nodes[node_id] = state
            self.set_models(state, models)
            return state
        moved = (state.address, state.port) != (address, port)
        state.slots, state.weight = slots, weight
        state.name = name
        state.address, state.port = address, port
        if moved:
            self._forget_machine(state)
        self.set_enabled(state, enabled)
        return state

    def _forget_machine(self, state: NodeState) -> None:
        """The node's address changed: a different machine, and everything
        known about the old one (health, models, version, breaker) is void."""
        self._caches_lost(state)
        state.healthy = False
        state.reason = "address changed, not probed yet"
        state.since = time.time()
        state.latency = state.last_latency = None
        state.latency_history.clear()
        state.version = None
        state.models, state.tags, state.loaded = {}, [], []
        state.breaker = Breaker()
        state.cooldown_until = state.last_error_at = 0.0
        state.probe_failures = 0
        state.next_probe_at = 0.0

    def remove(self, node_id: int) -> None:
        state = self.nodes.pop(node_id, None)
        if state is not None:
            self._caches_lost(state)

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
            self._caches_lost(state)  # it was unreachable: likely restarted
        if not state.resting():
            state.reason = "ok"  # else keep saying why it rests
        if changed:
            self._observed(state)
        return changed

    def mark_down(self, state: NodeState, reason: str) -> bool:
        """Returns True when the node just left the active pool."""
        changed = state.healthy
        if changed:
            state.healthy = False
            state.since = time.time()
        if not state.resting():
            state.reason = reason[:300]  # else keep saying why it rests
        if changed:
            self._observed(state)
        return changed

    def transport_failed(self, state: NodeState, reason: str) -> bool:
        """A live request could not talk to the node. Repeated failures open
        the circuit (see aivonx.breaker). Returns True when it just opened."""
        state.last_error_at = time.monotonic()
        if not state.breaker.record_failure(state.last_error_at):
            return False
        state.reason = (f"circuit open for {state.breaker.cooldown:g} s after "
                        f"{BREAKER_FAILURES} failures: {reason}")[:300]
        state.since = time.time()
        self._observed(state)
        return True

    def busy(self, state: NodeState, retry_after: float | None) -> None:
        """The node said 429/503: let it rest instead of hammering it."""
        rest = BUSY_COOLDOWN if retry_after is None else retry_after
        rest = max(1.0, min(rest, BUSY_COOLDOWN_MAX))
        was_resting = state.resting()
        state.cooldown_until = time.monotonic() + rest
        state.last_error_at = time.monotonic()
        state.reason = f"busy: resting {rest:g} s"
        if not was_resting:
            self._observed(state)

    def record_latency(self, state: NodeState, seconds: float) -> None:
        state.last_latency = seconds
        if state.latency is None:
            state.latency = seconds
        else:
            state.latency += LATENCY_SMOOTHING * (seconds - state.latency)
        state.latency_history.append(seconds)
        del state.latency_history[:-HISTORY_LENGTH]

    def update_tags(self, state: NodeState, entries: list[dict[str, Any]]) -> bool:
        """A node's /api/tags answer (from a probe or a listing). Returns True
        when its set of models changed, so the caller can persist it."""
        names = [e.get("model") or e.get("name") for e in entries]
        changed = set(names) != set(state.models.values())
        if changed:
            self.set_models(state, names)
        state.tags = entries
        if changed:
            self._observed(state)
        return changed

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

    def set_loaded(self, state: NodeState, entries: list[dict[str, Any]]) -> None:
        """A node's /api/ps answer: the models it holds in memory. Those no
        longer there took their KV caches with them."""
        if self._replace_loaded(state, entries):
            self._observed(state)

    def _replace_loaded(self, state: NodeState, entries: list[dict[str, Any]]) -> bool:
        """Whether the set of models held changed; those gone lose their caches."""
        before = state.loaded_keys() if state.loaded else set()
        state.loaded = entries
        after = state.loaded_keys() if entries else set()
        gone = before - after
        if gone:
            self._caches_lost(state, gone)
        return before != after

    def apply_shared(self, state: NodeState, healthy: bool, reason: str, breaker_for: float,
                     rest_for: float, models: list[str] | None,
                     loaded: list[str] | None) -> None:
        """What another instance observed of the node (validated by the
        caller): its health, how long it rests, its model lists. Not told
        to `observed`: a received change is not sent on. This instance's
        own probes and requests keep deciding afterwards, as ever."""
        now = time.monotonic()
        if healthy != state.healthy:
            state.healthy = healthy
            state.since = time.time()
            if healthy:
                self._caches_lost(state)
        if breaker_for > 0 and now + breaker_for > state.breaker.until:
            state.breaker.until = now + breaker_for
        if rest_for > 0 and now + rest_for > state.cooldown_until:
            state.cooldown_until = now + rest_for
        if reason:
            state.reason = reason[:300]
        if models is not None and set(models) != set(state.models.values()):
            self.set_models(state, models, [{"name": m, "model": m} for m in models])
        if loaded is not None:
            self._replace_loaded(state, [{"name": m, "model": m} for m in loaded])

    def set_version(self, state: NodeState, version: str | None) -> None:
        state.version = version

    def schedule_probe(self, state: NodeState, failures: int, at: float) -> None:
        """The monitor's backoff: consecutive failed probes and when next."""
        state.probe_failures = failures
        state.next_probe_at = at

    def begin(self, state: NodeState) -> None:
        state.active_requests += 1

    def unreserve(self, state: NodeState) -> None:
        """A reserved slot given back unused (its waiter left)."""
        state.active_requests -= 1

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

    def model_label(self, key: str) -> str:
        """A model's display name as the nodes list it, for metrics labels."""
        for node in self.nodes.values():
            name = node.models.get(key)
            if name is not None:
                return name
        return key

    def total_active(self) -> int:
        return sum(n.active_requests for n in self.nodes.values())
