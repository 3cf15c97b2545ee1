"""The cluster's live state as plain data, for the state API and the status page.

Next to the raw figures, `display` objects carry the strings the status page
shows (aivonx/display.py), so the page's script inserts them as they are.
"""
from __future__ import annotations

import math
import time
from typing import Any

from .display import cluster_display, node_display
from .registry import NodeState, Registry
from .scheduler import Scheduler


def _seconds(value: float | None) -> float | None:
    """Strict JSON has no Infinity or NaN: unknown is null."""
    if value is None or not math.isfinite(value):
        return None
    return round(value, 6)


def _average_wait(scheduler: Scheduler) -> float | None:
    """Mean wait of the requests that have left the queue (served, timed out
    or gone); those still waiting would count as zero."""
    left = scheduler.queued_total - scheduler.depth
    return _seconds(scheduler.wait_seconds_total / left) if left > 0 else None


def node_view(node: NodeState, now: float | None = None) -> dict[str, Any]:
    view = {
        "id": node.id,
        "name": node.name,
        "address": node.address,
        "port": node.port,
        "url": node.url,
        "status": node.status,            # active | standby | drained
        "health": node.health,            # healthy | degraded | unhealthy | drained
        "health_reason": node.health_reason,  # why not healthy; "" when healthy
        "enabled": node.enabled,
        "healthy": node.healthy,
        "since": node.since,               # unix time of the last status change
        "reason": node.reason,
        "latency": _seconds(node.latency),
        "last_latency": _seconds(node.last_latency),
        "latency_history": [_seconds(v) for v in node.latency_history],
        "version": node.version,
        "active_requests": node.active_requests,
        "slots": node.slots,
        "weight": node.weight,
        "requests_served": node.requests_served,
        "errors": node.errors,
        "models": sorted(node.models.values()),
        "loaded": sorted({e.get("model") or e.get("name") for e in node.loaded}),
    }
    view["display"] = node_display(view, now)
    return view


def cluster_state(registry: Registry, scheduler: Scheduler, strategy: str,
                  instance: str = "", cluster: Any = None) -> dict[str, Any]:
    """Everything the state API and the status page show, in one snapshot.
    `cluster` (aivonx.cluster.Cluster) when instances share Redis."""
    nodes = sorted(registry.nodes.values(), key=lambda n: n.id)
    now = time.time()
    views = [node_view(n, now) for n in nodes]
    state = {
        "active": [n.url for n in nodes if n.status == "active"],
        "standby": [n.url for n in nodes if n.status != "active"],
        "node_id_map": {str(n.id): n.url for n in nodes},
        "latencies": {n.url: _seconds(n.latency) for n in nodes},
        "active_counts": {n.url: n.active_requests for n in nodes},
        "models": {n.url: sorted(n.models.values()) for n in nodes},
        "loaded_models": {n.url: v["loaded"] for n, v in zip(nodes, views)},
        "strategy": strategy,
        "total_active_requests": registry.total_active(),
        "requests_served": registry.requests_served,
        "errors": registry.errors,
        "queue": {
            "depth": scheduler.depth,
            "limit": scheduler.max_queue,
            "max_wait": scheduler.max_wait,
            "oldest_wait": _seconds(scheduler.oldest_wait()),
            "queued_total": scheduler.queued_total,
            "rejected_total": scheduler.rejected_total,
            "average_wait": _average_wait(scheduler),
        },
        "nodes": views,
        "cache_affinity": scheduler.router.affinity(),
        "instance": instance,
        "cluster": cluster.view() if cluster is not None else {
            "redis": "off", "shared_slots": False, "since": None, "instances": [instance]},
    }
    state["display"] = cluster_display(state)
    return state
