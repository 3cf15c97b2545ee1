"""What clients list: the nodes' /api/tags and /api/ps, asked live and merged.

Listing live (rather than from the last probe) shows a model just pulled at
once; each answer also refreshes routing, so the two never disagree for long.
"""
from __future__ import annotations

import asyncio
from typing import Any, Callable

from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from . import catalog
from .monitor import parse_model_list
from .registry import NodeState, Registry


class Listings:
    def __init__(self, registry: Registry, client: AsyncHTTPClient, timeout: float,
                 on_models_changed: Callable[[NodeState], None]) -> None:
        self.registry = registry
        self.client = client
        self.timeout = timeout
        self.on_models_changed = on_models_changed

    async def fan_out(self, path: str) -> list[tuple[NodeState, list[dict[str, Any]]]]:
        """Each routable node's `models` array for `path`; a node that does not
        answer within the probe timeout is left out rather than holding up
        the listing."""

        async def one(node: NodeState) -> tuple[NodeState, list[dict[str, Any]]] | None:
            request = HTTPRequest(node.url + path, connect_timeout=self.timeout,
                                  request_timeout=self.timeout, follow_redirects=False)
            try:
                response = await self.client.fetch(request)
                return node, parse_model_list(response.body)
            except Exception:  # unreachable, an error status, or a bad body
                return None

        results = await asyncio.gather(*(one(n) for n in self.registry.routable()))
        return [r for r in results if r is not None]

    async def tags(self) -> list[dict[str, Any]]:
        """The merged /api/tags of the routable nodes."""
        lists = await self.fan_out("/api/tags")
        for node, entries in lists:
            if self.registry.update_tags(node, entries):
                self.on_models_changed(node)
        return catalog.merge_tags(entries for _, entries in lists)

    async def ps(self) -> list[dict[str, Any]]:
        """The merged /api/ps of the routable nodes."""
        lists = await self.fan_out("/api/ps")
        return catalog.merge_ps(entries for _, entries in lists)
