"""Prometheus metrics in the text exposition format.

Counters and histograms are plain dicts keyed by label tuples: one dict
update per observation on the hot path, and the text is built only when
scraped. Label values come from the registry (node names, model names
nodes listed), never from raw client input, so cardinality stays bounded.
"""
from __future__ import annotations

import bisect
from collections import defaultdict
from typing import Any

from .registry import Registry
from .scheduler import Scheduler

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.series: dict[tuple, list[float]] = {}

    def observe(self, labels: tuple, value: float) -> None:
        row = self.series.get(labels)
        if row is None:
            # one count per bucket, then +Inf count, then sum
            row = self.series[labels] = [0.0] * (len(self.buckets) + 2)
        row[bisect.bisect_left(self.buckets, value)] += 1
        row[-1] += value


def _escape(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple, extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class Metrics:
    def __init__(self) -> None:
        self.requests: dict[tuple, int] = defaultdict(int)      # node, model, code
        self.failures: dict[tuple, int] = defaultdict(int)      # node, model, kind
        self.duration = Histogram(LATENCY_BUCKETS)              # node, model
        self.ttft = Histogram(LATENCY_BUCKETS)                  # node, model
        self.overhead = Histogram(OVERHEAD_BUCKETS)             # ()
        self.queue_wait = Histogram(LATENCY_BUCKETS)            # ()
        self.rejected: dict[tuple, int] = defaultdict(int)      # reason
        # By key name (an admin-chosen, bounded label; never the key itself).
        self.key_requests: dict[tuple, int] = defaultdict(int)  # key
        self.key_tokens: dict[tuple, int] = defaultdict(int)    # key, kind
        self.key_rejected: dict[tuple, int] = defaultdict(int)  # limit

    def request_done(self, node: str, model: str, code: int, duration: float,
                     ttft: float | None) -> None:
        self.requests[(node, model, code)] += 1
        self.duration.observe((node, model), duration)
        if ttft is not None:
            self.ttft.observe((node, model), ttft)

    def failure(self, node: str, model: str, kind: str) -> None:
        self.failures[(node, model, kind)] += 1

    def render(self, registry: Registry, scheduler: Scheduler, cluster: Any = None) -> str:
        """The whole exposition, built at scrape time."""
        out: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")

        def counter(name: str, help_text: str, names: tuple[str, ...],
                    data: dict[tuple, int]) -> None:
            family(name, "counter", help_text)
            for key, value in sorted(data.items(), key=lambda kv: tuple(map(str, kv[0]))):
                out.append(f"{name}{_labels(names, key)} {value}")

        def histogram(name: str, help_text: str, names: tuple[str, ...],
                      hist: Histogram) -> None:
            family(name, "histogram", help_text)
            for key, row in sorted(hist.series.items(), key=lambda kv: tuple(map(str, kv[0]))):
                running = 0.0
                for bound, count in zip(hist.buckets, row):
                    running += count
                    le = 'le="%s"' % bound
                    out.append(f"{name}_bucket{_labels(names, key, le)} {running:g}")
                running += row[len(hist.buckets)]
                le = 'le="+Inf"'
                out.append(f"{name}_bucket{_labels(names, key, le)} {running:g}")
                out.append(f"{name}_count{_labels(names, key)} {running:g}")
                out.append(f"{name}_sum{_labels(names, key)} {row[-1]:.6f}")

        counter("aivonx_requests_total", "Relayed requests by node, model and status code.",
                ("node", "model", "code"), self.requests)
        counter("aivonx_request_failures_total",
                "Upstream failures by node, model and kind (connect, midstream, status).",
                ("node", "model", "kind"), self.failures)
        counter("aivonx_rejected_total", "Requests refused by the proxy, by reason.",
                ("reason",), self.rejected)
        counter("aivonx_key_requests_total", "Inference requests by key name.",
                ("key",), self.key_requests)
        counter("aivonx_key_tokens_total", "Tokens by key name and kind (prompt, completion).",
                ("key", "kind"), self.key_tokens)
        counter("aivonx_key_rejected_total",
                "Requests refused by key checks, by limit (unauthorized, model, rpm, "
                "max_concurrent, daily_tokens, monthly_tokens).", ("limit",), self.key_rejected)
        histogram("aivonx_request_duration_seconds", "Whole relayed exchange.",
                  ("node", "model"), self.duration)
        histogram("aivonx_time_to_first_chunk_seconds",
                  "From sending upstream to the first body chunk forwarded.",
                  ("node", "model"), self.ttft)
        histogram("aivonx_proxy_overhead_seconds",
                  "Time the proxy itself spent before forwarding (queueing excluded).",
                  (), self.overhead)
        histogram("aivonx_queue_wait_seconds", "Time spent waiting for a free slot.",
                  (), self.queue_wait)
        affinity = scheduler.router.affinity()
        counter("aivonx_cache_affinity_total",
                "cache_aware decisions: hit (the node held the prompt's prefix or session) "
                "or miss.", ("result",),
                {("hit",): affinity["hits"], ("miss",): affinity["misses"]})
        counter("aivonx_cache_routes_total", "cache_aware decisions by X-Aivonx-Route.",
                ("route",), {(k,): v for k, v in scheduler.router.routes.items()})
        nodes = sorted(registry.nodes.values(), key=lambda n: n.id)
        family("aivonx_in_flight_requests", "gauge", "Requests in flight per node.")
        out.extend(f"aivonx_in_flight_requests{_labels(('node',), (n.name,))} "
                   f"{n.active_requests}" for n in nodes)
        family("aivonx_node_slots", "gauge", "Parallel requests each node takes.")
        out.extend(f"aivonx_node_slots{_labels(('node',), (n.name,))} {n.slots}" for n in nodes)
        family("aivonx_node_health", "gauge", "1 for the node's current health state.")
        for n in nodes:
            for state in ("healthy", "degraded", "unhealthy", "drained"):
                out.append(f"aivonx_node_health{_labels(('node', 'state'), (n.name, state))} "
                           f"{int(n.health == state)}")
        family("aivonx_node_latency_seconds", "gauge", "Smoothed probe latency per node.")
        out.extend(f"aivonx_node_latency_seconds{_labels(('node',), (n.name,))} {n.latency:.6f}"
                   for n in nodes if n.latency is not None)
        family("aivonx_queue_depth", "gauge", "Requests waiting for a free slot.")
        out.append(f"aivonx_queue_depth {scheduler.depth}")
        family("aivonx_queue_limit", "gauge", "Most requests allowed to wait.")
        out.append(f"aivonx_queue_limit {scheduler.max_queue}")
        if cluster is not None:
            family("aivonx_redis_connected", "gauge",
                   "1 while Redis answers and node slots are counted cluster-wide, 0 while "
                   "each instance counts its share locally.")
            out.append(f"aivonx_redis_connected {int(cluster.connected)}")
            family("aivonx_redis_outages_total", "counter", "Times Redis became unreachable.")
            out.append(f"aivonx_redis_outages_total {cluster.outages}")
            family("aivonx_cluster_instances", "gauge", "Instances alive in the cluster.")
            out.append(f"aivonx_cluster_instances {len(cluster.instances)}")
        return "\n".join(out) + "\n"

