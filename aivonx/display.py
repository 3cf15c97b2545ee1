"""How the status page words the cluster's numbers: durations, latencies,
weights, the sparkline and the one-line summary.

Plain functions, no HTTP: the server renders the page with them and puts
the same strings in the state JSON the page polls, so the page's script
never formats anything itself and both always agree.
"""
from __future__ import annotations

import time
from typing import Any

from .registry import HISTORY_LENGTH

SPARK_WIDTH, SPARK_HEIGHT = 120, 28


def ago(since: float | None, now: float | None = None) -> str:
    """How long ago, compactly: 42s, 3m 07s, 5h 02m, 2d 4h."""
    if since is None:
        return "—"
    seconds = max(0, int((time.time() if now is None else now) - since))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h"


def latency_text(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 0.001:
        return "<1 ms"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds:.2f} s"


def wait_text(seconds: float | None) -> str:
    """A wait in the queue: 350 ms, 4.2 s, 17 s, 2m 00s."""
    if seconds is None:
        return "—"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes}m {rest:02d}s"


def weight_text(weight: float) -> str:
    """A weight as people write it: 3, 2.5, 0.25."""
    return f"{weight:g}"


def pool_text(node: dict[str, Any]) -> str:
    """Whether a degraded node still gets requests, or (resting) only those no
    other node can serve; the other health states say it themselves."""
    if node["health"] != "degraded":
        return ""
    return "still serving" if node["status"] == "active" else "last resort only"


def spark_points(history: list[float | None]) -> str:
    """SVG polyline points for a latency history, newest at the right edge,
    scaled to the largest sample."""
    values = [v for v in history if v is not None][-HISTORY_LENGTH:]
    if len(values) < 2:
        return ""
    top = max(values) * 1.15 or 1.0
    step = SPARK_WIDTH / (HISTORY_LENGTH - 1)
    offset = SPARK_WIDTH - step * (len(values) - 1)
    usable = SPARK_HEIGHT - 4
    return " ".join(f"{offset + i * step:.1f},{SPARK_HEIGHT - 2 - v / top * usable:.1f}"
                    for i, v in enumerate(values))


def overall(state: dict[str, Any]) -> tuple[str, str]:
    """One line for the whole cluster, and its tone: ok, warn or bad."""
    nodes = state["nodes"]
    active = sum(1 for n in nodes if n["status"] == "active")
    enabled = sum(1 for n in nodes if n["status"] != "drained")
    degraded = sum(1 for n in nodes if n["health"] == "degraded")
    if not nodes:
        return "No nodes configured", "warn"
    if active == 0:
        return "No node is serving", "bad"
    if active < enabled:
        down = enabled - active
        return f"{down} of {enabled} node{'s' if enabled != 1 else ''} down", "warn"
    if degraded:
        return f"All nodes serving, {degraded} degraded", "warn"
    return "All nodes serving", "ok"


def capacity(state: dict[str, Any]) -> int:
    """Requests the serving nodes take at once, before requests queue."""
    return sum(n["slots"] for n in state["nodes"] if n["status"] == "active")


def hit_rate_text(affinity: dict[str, Any] | None) -> str:
    """cache_aware's hit rate, e.g. "92% cache hits"; empty before any decision."""
    rate = (affinity or {}).get("hit_rate")
    return "" if rate is None else f"{rate * 100:.0f}% cache hits"


def node_display(node: dict[str, Any], now: float | None = None) -> dict[str, str]:
    """A node's strings as the page shows them, from its state view."""
    weight = node["weight"]
    return {
        "since": ago(node["since"], now),
        "pool": pool_text(node),
        "latency": latency_text(node["latency"]),
        "spark": spark_points(node["latency_history"]),
        "weight": weight_text(weight),
        "weight_label": "" if weight == 1 else f"weight {weight_text(weight)}",
    }


def cluster_display(state: dict[str, Any]) -> dict[str, str]:
    """The cluster's strings as the page shows them, from the state."""
    summary, tone = overall(state)
    queue = state["queue"]
    return {
        "summary": summary,
        "tone": tone,
        "serving": str(sum(1 for n in state["nodes"] if n["status"] == "active")),
        "capacity": str(capacity(state)),
        "queue_oldest": wait_text(queue["oldest_wait"]),
        "queue_average": wait_text(queue["average_wait"]),
        "queue_max_wait": wait_text(queue["max_wait"]),
        "cache_hit_rate": hit_rate_text(state.get("cache_affinity")),
        **instances_display(state["cluster"]),
    }


REDIS_TEXT = {"connected": "Redis connected: slots and health shared",
              "unreachable": "Redis unreachable: each instance on its share",
              "off": "one instance (no --redis)"}


def instances_display(cluster: dict[str, Any]) -> dict[str, str]:
    """The instances alive in the cluster and whether Redis answers."""
    names = cluster["instances"]
    return {"instances": ", ".join(names), "instance_count": str(len(names)),
            "redis": REDIS_TEXT.get(cluster["redis"], cluster["redis"])}


def keep_alive_text(policy: dict[str, Any]) -> str:
    """The keep_alive policy in a line, e.g. "30m; nomic-embed-text -1 (enforced)"."""
    parts = ["as clients ask" if policy["default"] is None else str(policy["default"])]
    parts += [f"{name} {value}" for name, value in sorted(policy["models"].items())]
    return "; ".join(parts) + (" (enforced)" if policy["enforce"] else "")
