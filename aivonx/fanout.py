"""Ask every routable node the same listing question at once."""
from __future__ import annotations

import asyncio
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from .monitor import ProbeError, parse_model_list
from .registry import NodeState


async def fetch_model_lists(client: AsyncHTTPClient, nodes: list[NodeState], path: str,
                            timeout: float) -> list[tuple[NodeState, list[dict[str, Any]]]]:
    """Each node's `models` array for `path`; a node that does not answer in
    `timeout` seconds is left out rather than holding up the listing."""

    async def one(node: NodeState) -> tuple[NodeState, list[dict[str, Any]]] | None:
        request = HTTPRequest(node.url + path, connect_timeout=timeout,
                              request_timeout=timeout, follow_redirects=False)
        try:
            response = await client.fetch(request)
            return node, parse_model_list(response.body)
        except (ProbeError, OSError, Exception):
            return None

    results = await asyncio.gather(*(one(n) for n in nodes))
    return [r for r in results if r is not None]
