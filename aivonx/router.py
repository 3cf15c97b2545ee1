"""Which nodes may serve a request for a model, best first.

Pure: it reads a registry snapshot and never touches the network or the
database. A strategy is a small function ordering the eligible nodes; the
relay tries them in that order until one starts answering.
"""
from __future__ import annotations

import itertools
import math
from typing import Callable, Iterable

from .registry import NodeState, Registry

Strategy = Callable[[list[NodeState], int], list[NodeState]]


class NoSuchModel(LookupError):
    """No node, up or down, has ever listed the model: 404."""


class NoHealthyNode(RuntimeError):
    """Nodes have the model but none of them can take a request now: 503."""


def _rotate(nodes: list[NodeState], turn: int) -> list[NodeState]:
    if not nodes:
        return nodes
    k = turn % len(nodes)
    return nodes[k:] + nodes[:k]


def least_active(nodes: list[NodeState], turn: int) -> list[NodeState]:
    """Fewest in-flight requests first; ties rotate so that an idle cluster
    spreads requests instead of piling them onto the first node."""
    return sorted(_rotate(nodes, turn), key=lambda n: n.active_requests)


def lowest_latency(nodes: list[NodeState], turn: int) -> list[NodeState]:
    """Lowest smoothed probe latency first; unknown latency last."""
    return sorted(_rotate(nodes, turn),
                  key=lambda n: (math.inf if n.latency is None else n.latency,
                                 n.active_requests))


def round_robin(nodes: list[NodeState], turn: int) -> list[NodeState]:
    """Each node in turn, whatever its load."""
    return _rotate(sorted(nodes, key=lambda n: n.id), turn)


STRATEGIES: dict[str, Strategy] = {
    "least_active": least_active,
    "lowest_latency": lowest_latency,
    "round_robin": round_robin,
}
DEFAULT_STRATEGY = "least_active"


class Router:
    def __init__(self, registry: Registry, strategy: str = DEFAULT_STRATEGY) -> None:
        self.registry = registry
        self.strategy = strategy
        self._turns = itertools.count()

    @property
    def strategy(self) -> str:
        return self._strategy

    @strategy.setter
    def strategy(self, name: str) -> None:
        if name not in STRATEGIES:
            raise ValueError(f"unknown strategy {name!r}; valid: {', '.join(STRATEGIES)}")
        self._strategy = name

    def candidates(self, key: str) -> list[NodeState]:
        """Routable nodes that have the model (canonical key), best first."""
        having = [n for n in self.registry.nodes.values() if n.has_model(key)]
        if not having:
            raise NoSuchModel(key)
        up = [n for n in having if n.routable]
        if not up:
            raise NoHealthyNode(key)
        return self.order(up)

    def order(self, nodes: Iterable[NodeState]) -> list[NodeState]:
        return STRATEGIES[self._strategy](sorted(nodes, key=lambda n: n.id), next(self._turns))
