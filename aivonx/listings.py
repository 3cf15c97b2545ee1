"""What clients list: the nodes' /api/tags and /api/ps, asked live and merged.

Listing live (rather than from the last probe) shows a model just pulled at
once; each answer also refreshes routing, so the two never disagree for long.

A model is listed if and only if a request for it would be routed now: the
nodes asked are those the router may use (`Router.serving`), resting ones
included, and a node that does not answer in time is listed from its last
probe, since routing still trusts it.

A node may list thousands of models, and parsing, merging and encoding them
costs tens of milliseconds each: a node's answer is parsed again only when
its bytes change, and the merged listing (and what is derived from it: the
JSON answers, the name index) is computed again only when some node's list
or the set of nodes changes.
"""
from __future__ import annotations

import asyncio
import json
from typing import Any, Callable

from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from . import catalog, modelnames
from .monitor import parse_model_list
from .registry import NodeState, Registry
from .router import Router

Entries = list[dict[str, Any]]


def _dumps(data: Any) -> bytes:
    return json.dumps(data, allow_nan=False, separators=(",", ":")).encode()


class Listings:
    def __init__(self, registry: Registry, router: Router, client: AsyncHTTPClient,
                 timeout: float, on_models_changed: Callable[[NodeState], None]) -> None:
        self.registry = registry
        self.router = router
        self.client = client
        self.timeout = timeout
        self.on_models_changed = on_models_changed
        self._answers: dict[tuple[int, str], tuple[bytes, Entries]] = {}
        self._derived: dict[str, tuple[tuple, Any]] = {}
        self.merges = 0  # merged listings computed so far

    async def _fetch(self, node: NodeState, path: str) -> Entries | None:
        request = HTTPRequest(node.url + path, connect_timeout=self.timeout,
                              request_timeout=self.timeout, follow_redirects=False)
        try:
            body = (await self.client.fetch(request)).body
        except Exception:  # unreachable or an error status
            return None
        known = self._answers.get((node.id, path))
        if known is not None and known[0] == body:
            return known[1]  # the same bytes: the same list, not parsed again
        try:
            entries = parse_model_list(body)
        except Exception:  # a bad body
            return None
        self._answers[(node.id, path)] = (body, entries)
        return entries

    async def fan_out(self, path: str) -> list[tuple[NodeState, Entries | None]]:
        """Each serving node's `models` array for `path`, asked live; None
        for a node that did not answer within the probe timeout (it does not
        hold up the listing)."""
        nodes = sorted(self.router.serving(), key=lambda n: n.id)
        for key in [k for k in self._answers if k[0] not in self.registry.nodes]:
            del self._answers[key]  # removed nodes
        lists = await asyncio.gather(*(self._fetch(n, path) for n in nodes))
        return list(zip(nodes, lists))

    def _memo(self, name: str, key: tuple, compute: Callable[[], Any]) -> Any:
        """`compute()` for these node lists, reused while they stay the same
        objects (a list object is replaced whenever its node's answer changes)."""
        kept = self._derived.get(name)
        if kept is not None and len(kept[0]) == len(key) and all(
                a[0] == b[0] and a[1] is b[1] for a, b in zip(kept[0], key)):
            return kept[1]
        value = compute()
        self._derived[name] = (key, value)
        return value

    async def _tag_lists(self) -> tuple:
        """(node id, entries) of every serving node, as a memo key; a node
        that did not answer counts with the list of its last probe."""
        key = []
        for node, entries in await self.fan_out("/api/tags"):
            if entries is None:
                entries = node.tags
            elif node.tags is not entries and self.registry.update_tags(node, entries):
                self.on_models_changed(node)
            key.append((node.id, entries))
        return tuple(key)

    def _merged_tags(self, key: tuple) -> Entries:
        def merge() -> Entries:
            self.merges += 1
            return catalog.merge_tags(entries for _, entries in key)
        return self._memo("tags", key, merge)

    async def tags(self) -> Entries:
        """The merged /api/tags of the serving nodes."""
        return self._merged_tags(await self._tag_lists())

    async def tags_json(self) -> bytes:
        """`{"models": [...]}` as /api/tags answers it, encoded."""
        key = await self._tag_lists()
        return self._memo("tags.json", key, lambda: _dumps({"models": self._merged_tags(key)}))

    async def openai_models_json(self) -> bytes:
        """The merged listing as OpenAI's /v1/models answers it, encoded."""
        key = await self._tag_lists()
        return self._memo("openai.json", key, lambda: _dumps(
            catalog.openai_model_list(self._merged_tags(key))))

    async def find_model(self, name: str) -> dict[str, Any] | None:
        """The merged entry for a model name (Ollama's name rules), if listed."""
        key = await self._tag_lists()
        index = self._memo("tags.index", key,
                           lambda: catalog.index_tags(self._merged_tags(key)))
        return index.get(modelnames.canonical(name))

    async def ps(self) -> Entries:
        """The merged /api/ps of the serving nodes."""
        key = []
        for node, entries in await self.fan_out("/api/ps"):
            if entries is None:
                entries = node.loaded
            elif node.loaded is not entries:
                self.registry.set_loaded(node, entries)  # warm_first reads it too
            key.append((node.id, entries))
        key = tuple(key)

        def merge() -> Entries:
            self.merges += 1
            return catalog.merge_ps(entries for _, entries in key)
        return self._memo("ps", key, merge)
