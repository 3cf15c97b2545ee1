"""Health and model probes of every node, on a PeriodicCallback.

Each cycle probes all nodes concurrently, and each probe has its own short
timeout, so one dead node never delays the others. A node that answers
again is returned to the pool with the model list fetched in the same
probe, so it is routable at once.
"""
from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from typing import Any, Callable

from tornado.httpclient import AsyncHTTPClient, HTTPRequest, HTTPResponse
from tornado.ioloop import PeriodicCallback

from .errors import out_of_descriptors
from .registry import NodeState, Registry
from .relay.resolver import CachingResolver, Networks

log = logging.getLogger("aivonx.monitor")

# Nothing a node sends is trusted: bound what a probe reads.
MAX_PROBE_BODY = 16 * 1024 * 1024
MAX_MODELS = 10_000
# An unreachable node is probed every interval for its first failures (a
# brief outage is noticed at once), then with exponential backoff up to
# this cap, so a box that is off for hours costs nearly nothing.
BACKOFF_AFTER = 3
BACKOFF_MAX = 60.0


class ProbeError(Exception):
    pass


def make_probe_client(node_ssl: ssl.SSLContext | None = None,
                      allowed: Networks = ()) -> AsyncHTTPClient:
    """Probes have their own client so they never queue behind generations;
    `node_ssl` verifies HTTPS nodes as the relay does."""
    return AsyncHTTPClient(force_instance=True, max_clients=1000,
                           max_body_size=MAX_PROBE_BODY, resolver=CachingResolver(allowed),
                           defaults={"ssl_options": node_ssl} if node_ssl else None)


def parse_model_list(body: bytes) -> list[dict[str, Any]]:
    """The `models` array of an /api/tags or /api/ps answer, keeping only
    well-formed entries."""
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise ProbeError(f"invalid JSON: {exc}") from None
    models = data.get("models") if isinstance(data, dict) else None
    if models is None:
        return []
    if not isinstance(models, list):
        raise ProbeError("'models' is not a list")
    return [m for m in models[:MAX_MODELS]
            if isinstance(m, dict) and isinstance(m.get("model") or m.get("name"), str)]


class Monitor:
    def __init__(self, registry: Registry, *, interval: float, timeout: float,
                 on_models_changed: Callable[[NodeState], None] | None = None,
                 on_status_changed: Callable[[NodeState], None] | None = None,
                 node_ssl: ssl.SSLContext | None = None, allowed: Networks = ()) -> None:
        self.registry = registry
        self.interval = interval
        self.timeout = timeout
        self.client = make_probe_client(node_ssl, allowed)
        self.on_models_changed = on_models_changed
        self.on_status_changed = on_status_changed
        self._periodic: PeriodicCallback | None = None
        self._cycle: asyncio.Future | None = None
        self.cycles = 0

    def start(self) -> None:
        self._periodic = PeriodicCallback(self._tick, self.interval * 1000)
        self._periodic.start()

    def stop(self) -> None:
        if self._periodic is not None:
            self._periodic.stop()
        self.client.close()

    def _tick(self) -> None:
        if self._cycle is not None and not self._cycle.done():
            return  # the previous cycle is still waiting on its timeouts
        now = time.monotonic()
        due = [n for n in self.registry.nodes.values() if n.next_probe_at <= now]
        self._cycle = asyncio.ensure_future(self.probe_all(due))

    async def probe_all(self, nodes: list[NodeState] | None = None) -> None:
        if nodes is None:
            nodes = list(self.registry.nodes.values())
        await asyncio.gather(*(self.probe(n) for n in nodes), return_exceptions=True)
        self.cycles += 1

    def _schedule_next(self, node: NodeState, failed: bool) -> None:
        failures = node.probe_failures + 1 if failed else 0
        delay = 0.0
        if failures >= BACKOFF_AFTER:
            exponent = failures - BACKOFF_AFTER + 1
            delay = min(self.interval * 2 ** min(exponent, 16), max(BACKOFF_MAX, self.interval))
        # Half an interval early, so the node is due at the next tick.
        self.registry.schedule_probe(node, failures,
                                     time.monotonic() + delay - self.interval / 2)

    async def _get(self, node: NodeState, path: str) -> HTTPResponse:
        request = HTTPRequest(node.url + path, connect_timeout=self.timeout,
                              request_timeout=self.timeout, follow_redirects=False)
        return await self.client.fetch(request, raise_error=True)

    async def probe(self, node: NodeState) -> None:
        """GET / for latency, /api/tags for models, /api/ps for loaded models,
        /api/version for the version; all at once."""
        address = (node.address, node.port)
        started = time.monotonic()

        async def timed_root() -> float:
            await self._get(node, "/")
            return time.monotonic() - started

        results = await asyncio.gather(
            timed_root(), self._get(node, "/api/tags"), self._get(node, "/api/ps"),
            self._get(node, "/api/version"), return_exceptions=True)
        if (node.address, node.port) != address or node.id not in self.registry.nodes:
            return  # edited or removed while probing: this result is stale
        if any(out_of_descriptors(r) for r in results):
            # The proxy's own shortage says nothing about the node.
            log.debug("probe of node %s skipped: out of file descriptors", node.name)
            return
        latency, tags, ps, version = results
        try:
            if isinstance(latency, BaseException):
                raise ProbeError(_reason(latency))
            if isinstance(tags, BaseException):
                raise ProbeError(f"/api/tags: {_reason(tags)}")
            tag_entries = parse_model_list(tags.body)
        except ProbeError as exc:
            self._schedule_next(node, failed=True)
            if self.registry.mark_down(node, str(exc)):
                log.warning("node %s (%s) is down: %s", node.name, node.url, exc)
                self._status_changed(node)
            return
        self._schedule_next(node, failed=False)
        self.registry.record_latency(node, latency)
        if self.registry.update_tags(node, tag_entries) and self.on_models_changed is not None:
            self.on_models_changed(node)
        if not isinstance(ps, BaseException):
            try:
                self.registry.set_loaded(node, parse_model_list(ps.body))
            except ProbeError:
                self.registry.set_loaded(node, [])
        if not isinstance(version, BaseException):
            self.registry.set_version(node, parse_version_body(version.body))
        if self.registry.mark_up(node):
            log.info("node %s (%s) is back with %d models", node.name, node.url, len(node.models))
            self._status_changed(node)

    def _status_changed(self, node: NodeState) -> None:
        if self.on_status_changed is not None:
            self.on_status_changed(node)


def parse_version_body(body: bytes) -> str | None:
    try:
        data = json.loads(body)
    except ValueError:
        return None
    version = data.get("version") if isinstance(data, dict) else None
    return version[:64] if isinstance(version, str) else None


def _reason(exc: BaseException) -> str:
    return str(exc) or exc.__class__.__name__
