"""Which nodes may serve a request for a model, best first.

Pure: it reads a registry snapshot and never touches the network or the
database. A strategy is a small function ordering the eligible nodes; the
relay tries them in that order until one starts answering.
"""
from __future__ import annotations

import itertools
import math
from typing import Callable, Optional

from .prefix import CachedPrompt, PrefixMemory, RoutingHint
from .registry import NodeState, Registry

Strategy = Callable[[list[NodeState], str, "Router", Optional[RoutingHint]], list[NodeState]]
DEFAULT_LOAD_FACTOR = 1.25


class Unroutable(Exception):
    """No node can be given to a request now (the kinds below say why)."""


class NoSuchModel(Unroutable, LookupError):
    """No node, up or down, has ever listed the model: 404."""


class NoHealthyNode(Unroutable, RuntimeError):
    """Nodes have the model but none of them can take a request now: 503."""


def serves(node: NodeState) -> bool:
    """Enabled and answering probes: routable, or resting (a last resort)."""
    return node.enabled and node.healthy


def _rotate(nodes: list[NodeState], turn: int) -> list[NodeState]:
    if not nodes:
        return nodes
    k = turn % len(nodes)
    return nodes[k:] + nodes[:k]


def least_active(nodes: list[NodeState], key: str, router: "Router",
                 hint: RoutingHint | None = None) -> list[NodeState]:
    """Fewest in-flight requests per unit of weight first; ties rotate so
    that an idle cluster spreads requests instead of piling them onto the
    first node."""
    return sorted(_rotate(nodes, router.next_turn()),
                  key=lambda n: n.active_requests / n.weight)


def lowest_latency(nodes: list[NodeState], key: str, router: "Router",
                   hint: RoutingHint | None = None) -> list[NodeState]:
    """Lowest smoothed probe latency first; unknown latency last."""
    return sorted(_rotate(nodes, router.next_turn()),
                  key=lambda n: (math.inf if n.latency is None else n.latency,
                                 n.active_requests / n.weight))


def round_robin(nodes: list[NodeState], key: str, router: "Router",
                hint: RoutingHint | None = None) -> list[NodeState]:
    """Each node in turn, whatever its load, as often as its weight says
    (smooth weighted round robin: heavier nodes are spread, not bunched)."""
    credits = router.credits
    total = 0.0
    for node in nodes:
        credits[node.id] = credits.get(node.id, 0.0) + node.weight
        total += node.weight
    ordered = sorted(nodes, key=lambda n: (-credits[n.id], n.id))
    if ordered:
        credits[ordered[0].id] -= total
    return ordered


def warm_first(nodes: list[NodeState], key: str, router: "Router",
               hint: RoutingHint | None = None) -> list[NodeState]:
    """Nodes that already hold the model in memory first (a cold load costs
    seconds to minutes), each group in least_active order."""
    ordered = least_active(nodes, key, router)
    return sorted(ordered, key=lambda n: key not in n.loaded_keys())


# A node may take this many requests beyond factor x mean: with a few in
# flight a node, the rounding alone would otherwise break affinity for a
# request the node can serve at once, and a prefill elsewhere costs more.
LOAD_HEADROOM = 1


def within_bound(nodes: list[NodeState], factor: float) -> set[int]:
    """The nodes that may take one more request without going more than
    `factor` above the candidates' mean in-flight load (per unit of weight,
    plus LOAD_HEADROOM): consistent hashing with bounded loads, so that
    affinity never piles a hot conversation or tenant onto one node."""
    total = sum(n.active_requests for n in nodes) + 1
    weight = sum(n.weight for n in nodes) or 1.0
    return {n.id for n in nodes
            if n.active_requests + 1
            <= max(1, math.ceil(factor * total * n.weight / weight)) + LOAD_HEADROOM}


def cache_aware(nodes: list[NodeState], key: str, router: "Router",
                hint: RoutingHint | None = None) -> list[NodeState]:
    """The nodes holding the longest part of the request's prompt (or its
    session) first, each only while within the load bound: deepest, then
    those where it overwrites no other prompt's only copy, then least
    loaded. Then the rest: within the bound first, then those whose cache
    keeps every other prompt, warm ones, the prompt's last home (where its
    first block was served last, so a tenant evicted there comes back
    rather than spreading), and those holding fewest other prompts.
    Ollama reuses a cached prefix, so such a node prefills only what is
    new; and a tenant kept on few nodes stays cached there."""
    rest = warm_first(nodes, key, router)
    if hint is None:
        return rest
    memory = router.prefixes
    matches = memory.matches(hint)
    router.last_matches = (hint, matches)
    bound = within_bound(nodes, router.load_factor)
    preferred = sorted((n for n in nodes if n.id in matches and n.id in bound),
                       key=lambda n: (-matches[n.id][0], memory.evicts(n.id, key, hint, n.slots),
                                      n.active_requests / n.weight, -matches[n.id][1]))
    if preferred:
        first = {n.id for n in preferred}
        rest = [n for n in rest if n.id not in first]
    if hint.blocks:
        home = memory.home(hint)
        rest.sort(key=lambda n: (n.id not in bound, memory.evicts(n.id, key, hint, n.slots),
                                 key not in n.loaded_keys(), n.id != home,
                                 memory.families(n.id, key)))
    return preferred + rest


STRATEGIES: dict[str, Strategy] = {
    "least_active": least_active,
    "lowest_latency": lowest_latency,
    "round_robin": round_robin,
    "warm_first": warm_first,
    "cache_aware": cache_aware,
}
DEFAULT_STRATEGY = "cache_aware"


class Router:
    def __init__(self, registry: Registry, strategy: str = DEFAULT_STRATEGY) -> None:
        self.registry = registry
        self.strategy = strategy
        self._turns = itertools.count()
        self.credits: dict[int, float] = {}
        self.load_factor = DEFAULT_LOAD_FACTOR
        self.prefixes = PrefixMemory()
        self.routes: dict[str, int] = {}  # why cache_aware chose its nodes, counted
        # The last decision's prefix matches, so that saying why a node was
        # chosen does not look them up again.
        self.last_matches: tuple[RoutingHint | None, dict] = (None, {})
        registry.caches_lost = self.prefixes.forget

    @property
    def strategy(self) -> str:
        return self._strategy

    @strategy.setter
    def strategy(self, name: str) -> None:
        if name not in STRATEGIES:
            raise ValueError(f"unknown strategy {name!r}; valid: {', '.join(STRATEGIES)}")
        self._strategy = name

    def next_turn(self) -> int:
        return next(self._turns)

    def eligible(self, key: str) -> list[NodeState]:
        """Routable nodes that have the model (canonical key), unordered.
        When none is, nodes that answer probes but rest (open circuit, busy
        cooldown) are tried rather than refusing the request outright."""
        having = [n for n in self.registry.nodes.values() if n.has_model(key)]
        if not having:
            raise NoSuchModel(key)
        up = [n for n in having if n.routable]
        if not up:
            up = [n for n in having if serves(n)]
        if not up:
            raise NoHealthyNode(key)
        return up

    def serving(self) -> list[NodeState]:
        """The nodes some request may be routed to now: the routable ones
        and, as a last resort for the models only they have, the resting
        ones. A model is routed if and only if one of these has it, so the
        listings show exactly their models."""
        return [n for n in self.registry.nodes.values() if serves(n)]

    def candidates(self, key: str, eligible: list[NodeState] | None = None,
                   hint: RoutingHint | None = None) -> list[NodeState]:
        """The eligible nodes best first, degraded ones after healthy ones.
        Each call is one routing decision: it advances the rotation. Pass
        `eligible` when the caller has just computed it."""
        up = self.eligible(key) if eligible is None else eligible
        ordered = STRATEGIES[self._strategy](sorted(up, key=lambda n: n.id), key, self, hint)
        return sorted(ordered, key=lambda n: n.health != "healthy")

    def chosen(self, node: NodeState, key: str,
               hint: RoutingHint | None) -> tuple[str, CachedPrompt | None]:
        """A request got a slot on `node`: say why (the X-Aivonx-Route
        header) and, under cache_aware, remember that the node holds its
        prompt from now on, in the cache slot returned (for
        `prefixes.release` once the request ends)."""
        if self._strategy != "cache_aware":
            return self._strategy, None
        route, cached = "least_active", None
        if hint is not None:
            if hint.session is not None and self.prefixes.session_node(hint) == node.id:
                route = "session"
            elif hint.blocks and node.id in self._matches(hint):
                route = "prefix"
            cached = self.prefixes.record(node.id, key, hint, node.slots)
        if route == "least_active" and key in node.loaded_keys():
            route = "warm"
        self.routes[route] = self.routes.get(route, 0) + 1
        return route, cached

    def _matches(self, hint: RoutingHint) -> dict:
        seen, matches = self.last_matches
        return matches if seen is hint else self.prefixes.matches(hint)

    def affinity(self) -> dict[str, int | float | None]:
        """Affinity hits (the node held the prompt or session) and misses
        under cache_aware, for the metrics and the status page."""
        hits = self.routes.get("prefix", 0) + self.routes.get("session", 0)
        misses = self.routes.get("warm", 0) + self.routes.get("least_active", 0)
        return {"hits": hits, "misses": misses,
                "hit_rate": round(hits / (hits + misses), 4) if hits + misses else None}
