"""Several nodes' progress lines merged into one stream in Ollama's shape.

Ollama's own clients must be able to follow a cluster-wide pull as if it
were one node: a layer's `total` and `completed` are summed over the nodes,
each plain status line is sent once, and errors and the final success wait
for the end (the service decides them from every node's result).
"""
from __future__ import annotations

from typing import Any

from ..registry import NodeState

# A node sending ever new statuses must not grow memory without bound.
MAX_TRACKED = 1000


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


class ProgressMerger:
    """Merges the progress lines of several nodes into one Ollama stream."""

    def __init__(self, nodes: int | None = None) -> None:
        self.nodes = nodes
        self.statuses: set[str] = set()
        self.layers: dict[str, dict[int, tuple[int, int]]] = {}

    def feed(self, node: NodeState, line: dict[str, Any]) -> dict[str, Any] | None:
        """The line to send for a node's line, or None to send nothing.
        Errors and successes wait for the end."""
        status = line.get("status")
        if "error" in line or not isinstance(status, str) or status == "success":
            return None
        status = status[:200]
        digest = line.get("digest")
        if isinstance(digest, str) and digest:
            digest = digest[:100]
            if digest not in self.layers and len(self.layers) >= MAX_TRACKED:
                return None
            per_node = self.layers.setdefault(digest, {})
            per_node[node.id] = (_count(line.get("total")), _count(line.get("completed")))
            out: dict[str, Any] = {"status": status, "digest": digest}
            total = sum(t for t, _ in per_node.values())
            completed = sum(c for _, c in per_node.values())
            if total:  # Ollama omits zero counts
                out["total"] = total
            if completed:
                out["completed"] = completed
            return out
        if status in self.statuses or len(self.statuses) >= MAX_TRACKED:
            return None
        self.statuses.add(status)
        return {"status": status}
