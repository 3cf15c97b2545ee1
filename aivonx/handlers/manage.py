"""The management API under /api/proxy: state, routing config, nodes.

Handlers stay thin: aivonx.nodes validates and applies every change, these
turn its answers into JSON. Each method's docstring, after `---`, is its
OpenAPI operation (aivonx.openapi collects them).
"""
from __future__ import annotations

import copy
import re
from typing import Any
from urllib.parse import urlencode

from .. import nodes, store
from ..auth import admin_required
from ..keepalive import PolicyError
from ..router import STRATEGIES
from ..status import cluster_state, node_view
from ..errors import ApiError
from .base import BaseHandler

MAX_BODY = 1024 * 1024  # management bodies are small; refuse before parsing
DEFAULT_LIMIT, MAX_LIMIT = 100, 1000


class ManageHandler(BaseHandler):
    """JSON in, JSON out; errors `{"error": ...}`, validation errors with
    the message of each field under `fields`. Changes are audited."""

    audited = True

    # A body that is no JSON object is a validation error like any other:
    # its 400 names `non_field_errors` under `fields`. Ollama's own model
    # operations keep Ollama's plain `{"error"}`.
    body_errors_have_fields = True

    def prepare(self) -> None:
        if len(self.request.body or b"") > MAX_BODY:
            raise ApiError(413, "request body too large")

    async def json_body(self) -> dict[str, Any]:
        try:
            return await super().json_body()
        except ApiError as exc:
            if exc.status != 400 or not self.body_errors_have_fields:
                raise
            raise nodes.ValidationError({"non_field_errors": exc.message},
                                        message=exc.message) from None

    def _handle_request_exception(self, e: BaseException) -> None:
        if isinstance(e, nodes.ValidationError):
            if not self._finished:
                self.clear()
                self.set_default_headers()
                if e.message is not None:
                    message = e.message
                elif e.status == 400:
                    message = "validation failed"
                else:
                    message = "; ".join(e.errors.values())
                self.write_json({"error": message, "fields": e.errors}, e.status)
            return
        super()._handle_request_exception(e)

    def int_argument(self, name: str, default: int | None, low: int, high: int) -> int | None:
        """A query argument as a bounded integer, or a 400 naming it. ASCII
        digits only: `int()` also takes `²`-like digits, and raises on some."""
        text = self.get_query_argument(name, None)
        if text is None or text == "":
            return default
        text = text.strip()
        if not _INTEGER.fullmatch(text):
            raise nodes.ValidationError({name: "must be an integer"})
        value = int(text)
        if not low <= value <= high:
            raise nodes.ValidationError({name: f"must be between {low} and {high}"})
        return value


# At most 40 ASCII digits: int() of a longer text costs more than it tells.
_INTEGER = re.compile(r"-?[0-9]{1,40}")
MAX_NODE_ID = 2 ** 63 - 1  # SQLite's largest integer


def parse_node_id(text: str) -> int:
    """A node id from a URL (the route admits ASCII digits only); ids beyond
    SQLite's integers cannot exist."""
    digits = text.lstrip("0") or "0"
    if len(digits) > len(str(MAX_NODE_ID)) or int(digits) > MAX_NODE_ID:
        raise ApiError(404, f"node {text[:20]} not found")
    return int(digits)


class ProxyStatusHandler(ManageHandler):
    def get(self) -> None:
        """Whether the proxy can serve anything: 200 with a routable node.
        ---
        tags: [state]
        summary: Readiness of the cluster
        description: 200 when at least one node is routable, 503 otherwise (for load balancers).
        responses:
          200: {description: At least one node is routable, content: {application/json: {schema: ProxyStatus}}}
          503: {description: No node is routable, content: {application/json: {schema: ProxyStatus}}}
        """
        registry = self.ctx.registry
        routable = len(registry.routable())
        body = {"status": "ok" if routable else "unavailable", "routable_nodes": routable,
                "total_nodes": len(registry.nodes)}
        if not routable:
            body["error"] = "no node is available"
        self.write_json(body, 200 if routable else 503)


class StateHandler(ManageHandler):
    def get(self) -> None:
        """The live cluster state.
        ---
        tags: [state]
        summary: Live cluster state
        description: >-
          Pools, health states and why, latencies (seconds, null while unknown),
          in-flight requests out of slots, weights and models of every node, and
          the wait queue, as routing sees them now. Public.
        responses:
          200: {description: The state, content: {application/json: {schema: State}}}
        """
        self.write_json(cluster_state(self.ctx.registry, self.ctx.scheduler, self.ctx.router.strategy,
                              self.ctx.instance, self.ctx.cluster))


ACTIVE_FIELDS = ("id", "name", "address", "port", "url", "active_requests", "status",
                 "latency", "models")


class ActiveRequestsHandler(ManageHandler):
    def get(self) -> None:
        """In-flight requests per node.
        ---
        tags: [state]
        summary: In-flight requests per node
        parameters:
          - {name: node_id, in: query, required: false, schema: {type: integer, format: int64}, description: Only this node}
        responses:
          200: {description: Requests in flight, content: {application/json: {schema: ActiveRequests}}}
          400: ValidationFailed
          404: NotFound
        """
        registry = self.ctx.registry
        wanted = self.int_argument("node_id", None, -(2 ** 63), MAX_NODE_ID)
        if wanted is None:
            states = sorted(registry.nodes.values(), key=lambda n: n.id)
        elif wanted in registry.nodes:
            states = [registry.nodes[wanted]]
        else:
            raise ApiError(404, f"node {wanted} not found")
        views = [node_view(n) for n in states]
        self.write_json({
            "nodes": [{k: v[k] for k in ACTIVE_FIELDS} for v in views],
            "total_active_requests": sum(n.active_requests for n in states),
        })


class ConfigHandler(ManageHandler):
    def config(self) -> dict[str, Any]:
        return {"strategy": self.ctx.router.strategy, "strategies": list(STRATEGIES),
                "cache_load_factor": self.ctx.router.load_factor,
                "keep_alive": self.ctx.keep_alive.as_dict(),
                "inference_auth": self.ctx.keys.mode}

    @admin_required
    def get(self) -> None:
        """The routing configuration and who may infer.
        ---
        tags: [config]
        summary: Routing configuration
        security: [{bearerAuth: []}]
        responses:
          200: {description: The configuration, content: {application/json: {schema: Config}}}
          401: Unauthorized
        """
        self.write_json(self.config())

    async def _update(self, partial: bool) -> None:
        body = await self.json_body()
        if "strategy" not in body and not partial:
            raise nodes.ValidationError({"strategy": "this field is required"})
        # Validate everything, store it in one transaction, then apply it:
        # a refused or failed write changes nothing.
        changes: dict[str, Any] = {}
        if "inference_auth" in body:
            self.ctx.keys.check_mode(body["inference_auth"])
            changes["inference_auth"] = body["inference_auth"]
        if "cache_load_factor" in body:
            changes["cache_load_factor"] = nodes.check_load_factor(body["cache_load_factor"])
        if "keep_alive" in body:
            candidate = copy.copy(self.ctx.keep_alive)
            try:
                candidate.update(body["keep_alive"])
            except PolicyError as exc:
                raise nodes.ValidationError(exc.errors) from None
            changes["keep_alive"] = candidate.as_dict()
        if "strategy" in body:
            changes["strategy"] = nodes.check_strategy(body["strategy"])
        await store.run(store.set_configs, changes)
        if "keep_alive" in changes:
            self.ctx.keep_alive.load(changes["keep_alive"])
            self.ctx.nodes.on_change("keep_alive", None)
        if "strategy" in changes:
            self.ctx.nodes.strategy_saved(changes["strategy"])
        if "cache_load_factor" in changes:
            self.ctx.nodes.load_factor_saved(changes["cache_load_factor"])
        if "inference_auth" in changes:
            self.ctx.keys.mode_saved(changes["inference_auth"])
        self.write_json(self.config())

    @admin_required
    async def put(self) -> None:
        """Replace the routing configuration; effective from the next request.
        ---
        tags: [config]
        summary: Set the routing configuration
        security: [{bearerAuth: []}]
        requestBody: {required: true, content: {application/json: {schema: ConfigInput}}}
        responses:
          200: {description: The new configuration, content: {application/json: {schema: Config}}}
          400: ValidationFailed
          401: Unauthorized
        """
        await self._update(partial=False)

    @admin_required
    async def patch(self) -> None:
        """Change part of the routing configuration; effective from the next request.
        ---
        tags: [config]
        summary: Change the routing configuration
        security: [{bearerAuth: []}]
        requestBody: {required: true, content: {application/json: {schema: ConfigPatch}}}
        responses:
          200: {description: The new configuration, content: {application/json: {schema: Config}}}
          400: ValidationFailed
          401: Unauthorized
        """
        await self._update(partial=True)


class NodesHandler(ManageHandler):
    def page_url(self, limit: int, offset: int) -> str:
        """Relative (path and query): the client's Host header is its own
        word, never echoed back as a link."""
        return f"{self.request.path}?{urlencode({'limit': limit, 'offset': offset})}"

    @admin_required
    def get(self) -> None:
        """List the nodes, paginated.
        ---
        tags: [nodes]
        summary: List nodes
        security: [{bearerAuth: []}]
        parameters:
          - {name: limit, in: query, required: false, schema: {type: integer, minimum: 1, maximum: 1000, default: 100}}
          - {name: offset, in: query, required: false, schema: {type: integer, minimum: 0, default: 0}}
        responses:
          200: {description: A page of nodes, content: {application/json: {schema: NodePage}}}
          400: ValidationFailed
          401: Unauthorized
        """
        limit = self.int_argument("limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
        offset = self.int_argument("offset", 0, 0, 2 ** 62)
        count = store.Node.select().count()
        rows = store.Node.select().order_by(store.Node.id).limit(limit).offset(offset)
        self.write_json({
            "count": count,
            "next": self.page_url(limit, offset + limit) if offset + limit < count else None,
            "previous": self.page_url(limit, max(offset - limit, 0)) if offset > 0 else None,
            "results": [nodes.node_dict(n) for n in rows],
        })

    @admin_required
    async def post(self) -> None:
        """Add a node; it is probed at once and routed to when healthy.
        ---
        tags: [nodes]
        summary: Add a node
        description: >-
          The node is probed at once and routed to when healthy. `slots` (default 4)
          is how many requests it serves at once, `weight` (default 1) its share of
          the traffic against the other nodes.
        security: [{bearerAuth: []}]
        requestBody: {required: true, content: {application/json: {schema: NodeInput}}}
        responses:
          201: {description: The node, content: {application/json: {schema: Node}}}
          400: ValidationFailed
          401: Unauthorized
          409: Conflict
        """
        node = await self.ctx.nodes.create_async(await self.json_body())
        self.set_header("Location", f"{self.request.path}/{node.id}")
        self.write_json(nodes.node_dict(node), 201)


class NodeHandler(ManageHandler):
    def _get_node(self, text: str) -> store.Node:
        node = store.Node.get_or_none(store.Node.id == parse_node_id(text))
        if node is None:
            raise ApiError(404, f"node {text} not found")
        return node

    @admin_required
    def get(self, node_id: str) -> None:
        """One node.
        ---
        tags: [nodes]
        summary: Get a node
        security: [{bearerAuth: []}]
        parameters: [{name: node_id, in: path, required: true, schema: {type: integer, format: int64, minimum: 1}}]
        responses:
          200: {description: The node, content: {application/json: {schema: Node}}}
          401: Unauthorized
          404: NotFound
        """
        self.write_json(nodes.node_dict(self._get_node(node_id)))

    async def _update(self, text: str, partial: bool) -> None:
        body = await self.json_body()
        try:
            node = await self.ctx.nodes.update_async(parse_node_id(text), body, partial)
        except LookupError:
            raise ApiError(404, f"node {text} not found") from None
        self.write_json(nodes.node_dict(node))

    @admin_required
    async def put(self, node_id: str) -> None:
        """Replace a node's settings (address required). `active: false` drains it.
        ---
        tags: [nodes]
        summary: Replace a node
        description: >-
          `address` is required; fields left out keep their values. `active: false`
          drains the node. New `slots` and `weight` apply from the next request.
        security: [{bearerAuth: []}]
        parameters: [{name: node_id, in: path, required: true, schema: {type: integer, format: int64, minimum: 1}}]
        requestBody: {required: true, content: {application/json: {schema: NodeInput}}}
        responses:
          200: {description: The node, content: {application/json: {schema: Node}}}
          400: ValidationFailed
          401: Unauthorized
          404: NotFound
          409: Conflict
        """
        await self._update(node_id, partial=False)

    @admin_required
    async def patch(self, node_id: str) -> None:
        """Change some of a node's settings. `active: false` drains it: requests in
        flight finish, no new ones are sent, probes never re-enable it.
        ---
        tags: [nodes]
        summary: Change a node
        description: >-
          Any subset of the fields. `active: false` drains the node: requests in
          flight finish, no new ones are sent, probes never re-enable it. New `slots`
          and `weight` apply from the next request; more slots serve waiting
          requests at once.
        security: [{bearerAuth: []}]
        parameters: [{name: node_id, in: path, required: true, schema: {type: integer, format: int64, minimum: 1}}]
        requestBody: {required: true, content: {application/json: {schema: NodePatch}}}
        responses:
          200: {description: The node, content: {application/json: {schema: Node}}}
          400: ValidationFailed
          401: Unauthorized
          404: NotFound
          409: Conflict
        """
        await self._update(node_id, partial=True)

    @admin_required
    async def delete(self, node_id: str) -> None:
        """Remove a node; requests it is serving finish.
        ---
        tags: [nodes]
        summary: Remove a node
        security: [{bearerAuth: []}]
        parameters: [{name: node_id, in: path, required: true, schema: {type: integer, format: int64, minimum: 1}}]
        responses:
          204: {description: Removed}
          401: Unauthorized
          404: NotFound
        """
        try:
            await self.ctx.nodes.delete_async(self._get_node(node_id).id)
        except LookupError:
            raise ApiError(404, f"node {node_id} not found") from None
        self.set_status(204)
        self.finish()


class HealthHandler(BaseHandler):
    def get(self) -> None:
        """Liveness of the proxy process itself.
        ---
        tags: [state]
        summary: Liveness
        responses:
          200: {description: The proxy is running, content: {application/json: {schema: Health}}}
        """
        self.write_json({"status": "healthy"})
