"""Which nodes a model operation goes to, and its merged progress.

Ollama's own clients must be able to drive a cluster-wide pull as if it
were one node: the merged stream keeps Ollama's line shape (a layer's
`total`/`completed` summed over the nodes, each plain status line once),
and its last line is `{"status": "success"}` only when every node succeeded.
"""
from __future__ import annotations

import asyncio
from typing import Any

from . import catalog, modelnames
from .pulls import NodeResult
from .registry import NodeState

# A node sending ever new statuses must not grow memory without bound.
MAX_TRACKED = 1000


def having(ctx: Any, name: str) -> list[NodeState]:
    """Routable nodes that list the model, by id."""
    key = modelnames.canonical(name)
    return sorted((n for n in ctx.registry.routable() if n.has_model(key)), key=lambda n: n.id)


def newest_copy(nodes: list[NodeState], name: str) -> NodeState:
    """The node holding the most recently modified copy of a model (a push
    sends one copy: pushing several would race on the registry's manifest)."""
    key = modelnames.canonical(name)

    def modified(node: NodeState) -> Any:
        for entry in node.tags:
            entry_name = entry.get("model") or entry.get("name") or ""
            try:
                if modelnames.canonical(entry_name) == key:
                    return catalog.parse_time(entry.get("modified_at"))
            except modelnames.InvalidModelName:
                continue
        return catalog.parse_time(None)

    return max(nodes, key=modified)  # max keeps the first of equals


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


class ProgressMerger:
    """Merges the progress lines of several nodes into one Ollama stream."""

    def __init__(self) -> None:
        self.statuses: set[str] = set()
        self.layers: dict[str, dict[int, tuple[int, int]]] = {}

    def feed(self, node: NodeState, line: dict[str, Any]) -> dict[str, Any] | None:
        """The line to send for a node's line, or None to send nothing.
        Errors and successes wait for the end (see final)."""
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


def failure_message(verb: str, nodes: list[NodeState],
                    errors: dict[int, str | None]) -> str | None:
    """None when no node has an error, else one message naming each failed
    node and its reason."""
    failed = [f"{n.name}: {errors[n.id]}" for n in nodes if errors.get(n.id)]
    if not failed:
        return None
    return f"{verb} failed on {len(failed)} of {len(nodes)} node(s): " + "; ".join(failed)


def common_refusal(results: dict[int, NodeResult]) -> tuple[int, str] | None:
    """When every node refused the request with the same client error (4xx),
    that status and the first node's message: the request itself is wrong,
    which is the client's to hear, not a failure of the cluster."""
    codes = {r.code for r in results.values()}
    if not results or any(r.ok for r in results.values()) or len(codes) != 1:
        return None
    code = codes.pop()
    if code is None or not 400 <= code < 500:
        return None
    return code, next(iter(results.values())).error or f"node answered {code}"


async def reprobe(ctx: Any, nodes: list[NodeState]) -> None:
    """Look at the nodes again now, so routing and listings show what the
    operation changed before the client hears it is done."""
    await asyncio.gather(*(ctx.monitor.probe(n) for n in nodes), return_exceptions=True)
