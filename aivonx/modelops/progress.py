"""Several nodes' progress lines merged into one stream in Ollama's shape.

Ollama's own clients must be able to follow a cluster-wide pull as if it
were one node: a layer's `total` and `completed` are summed over the nodes,
each plain status line is sent once, and errors and the final success wait
for the end (the service decides them from every node's result).

Nodes report at different times, so a plain sum goes back: one node done
(1.0), then a second node's first line doubles the total (0.5). Clients
draw a layer's bar from its first `total` (the `ollama` CLI never updates
it), so the merged total counts the nodes that have not reported the layer
yet at the size the others report (a digest names the same bytes
everywhere), and a line is sent only when neither `completed` nor the
fraction would go back; `completed` never exceeds `total`.
"""
from __future__ import annotations

from typing import Any

from ..registry import NodeState

# A node sending ever new statuses must not grow memory without bound.
MAX_TRACKED = 1000


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


class _Layer:
    """One digest: each node's own counts and what the stream last said."""

    def __init__(self) -> None:
        self.per_node: dict[int, tuple[int, int]] = {}
        self.sent: tuple[int, int] | None = None  # (total, completed) last sent


class ProgressMerger:
    """Merges the progress lines of `nodes` nodes into one Ollama stream.
    Without `nodes` (unknown), the totals are those reported so far."""

    def __init__(self, nodes: int | None = None) -> None:
        self.nodes = nodes
        self.statuses: set[str] = set()
        self.layers: dict[str, _Layer] = {}

    def feed(self, node: NodeState, line: dict[str, Any]) -> dict[str, Any] | None:
        """The line to send for a node's line, or None to send nothing.
        Errors and successes wait for the end."""
        status = line.get("status")
        if "error" in line or not isinstance(status, str) or status == "success":
            return None
        status = status[:200]
        digest = line.get("digest")
        if isinstance(digest, str) and digest:
            return self._layer_line(node, status, digest[:100], line)
        if status in self.statuses or len(self.statuses) >= MAX_TRACKED:
            return None
        self.statuses.add(status)
        return {"status": status}

    def _layer_line(self, node: NodeState, status: str, digest: str,
                    line: dict[str, Any]) -> dict[str, Any] | None:
        layer = self.layers.get(digest)
        if layer is None:
            if len(self.layers) >= MAX_TRACKED:
                return None
            layer = self.layers[digest] = _Layer()
        own_total, own_completed = _count(line.get("total")), _count(line.get("completed"))
        if own_total:  # a node's own count cannot pass its own total either
            own_completed = min(own_completed, own_total)
        layer.per_node[node.id] = (own_total, own_completed)
        total, completed = self._sums(layer)
        if layer.sent is not None:
            sent_total, sent_completed = layer.sent
            if completed < sent_completed:
                return None
            if (self.nodes is not None and sent_total and total
                    and completed * sent_total < sent_completed * total):
                return None  # the fraction would go back: wait for the others
        layer.sent = (total, completed)
        out: dict[str, Any] = {"status": status, "digest": digest}
        if total:  # Ollama omits zero counts
            out["total"] = total
        if completed:
            out["completed"] = completed
        return out

    def _sums(self, layer: _Layer) -> tuple[int, int]:
        totals = [t for t, _ in layer.per_node.values()]
        total = sum(totals)
        if self.nodes is not None:
            silent = max(0, self.nodes - len(layer.per_node))
            total += silent * max(totals, default=0)
        completed = sum(c for _, c in layer.per_node.values())
        return total, min(completed, total) if total else completed
