"""Model operations across the cluster, admin only.

`POST /api/proxy/pull` is the management API's pull: every node's progress
tagged with the node, then a per-node summary. The Ollama-native
`/api/pull`, `/api/delete`, `/api/copy`, `/api/create` and `/api/push` keep
Ollama's request and answer shapes, so `ollama pull` and the SDKs work
against the cluster as against one node.
"""
from __future__ import annotations

import json
from typing import Any, Awaitable, Callable

from tornado.iostream import StreamClosedError

from .. import modelnames, modelops, pulls
from ..auth import admin_required
from ..registry import NodeState
from ..context import Context
from ..errors import ApiError
from .manage import ManageHandler
from .relayed import check_types


# The fields the handlers read; others go to the nodes as they came.
FIELDS: dict[str, tuple[type, ...]] = {
    "model": (str,), "name": (str,), "from": (str,), "source": (str,),
    "destination": (str,), "stream": (bool,), "insecure": (bool,),
}


def _model(body: dict[str, Any], *fields: str) -> str:
    """The model a request names, checked by Ollama's naming rules."""
    name = next((body[f] for f in fields or ("model", "name") if body.get(f) is not None), None)
    if name is None or not name.strip():
        raise ApiError(400, "model is required")
    try:
        modelnames.canonical(name)
    except modelnames.InvalidModelName as exc:
        raise ApiError(400, f"invalid model name: {exc}") from None
    return name


class ModelOpHandler(ManageHandler):
    """Streams lines to the client; closes every upstream connection when
    the client goes away."""

    def initialize(self, ctx: Context) -> None:
        super().initialize(ctx)
        self.cancel = pulls.Cancel()
        self.streaming = False

    def on_connection_close(self) -> None:
        self.cancel.cancel()

    async def request_body(self) -> dict[str, Any]:
        """The JSON body, with the fields read here of the right types."""
        body = await self.json_body()
        check_types(body, FIELDS)
        return body

    def routable(self) -> list[NodeState]:
        nodes = sorted(self.ctx.registry.routable(), key=lambda n: n.id)
        if not nodes:
            raise ApiError(503, "no node is available")
        return nodes

    async def send_line(self, obj: dict[str, Any]) -> None:
        """One NDJSON line, flushed; the first one commits the answer to a
        200 stream (until then an error can still get its own status)."""
        if self.cancel.cancelled:
            return
        if not self.streaming:
            self.streaming = True
            self.set_status(200)
            self.set_header("Content-Type", "application/x-ndjson")
        self.write(json.dumps(obj, separators=(",", ":")) + "\n")
        try:
            await self.flush()
        except StreamClosedError:
            self.cancel.cancel()

    def end(self) -> None:
        if not self.cancel.cancelled and not self.request.connection.stream.closed():
            self.finish()

    async def progress_op(self, verb: str, path: str, body: dict[str, Any],
                          targets: list[NodeState], stream: bool, reprobe: bool = True) -> None:
        """Run a progress-streaming operation on the targets with one merged
        Ollama stream: success at the end only if every node succeeded."""
        merger = modelops.ProgressMerger()

        async def on_line(node: NodeState, line: dict[str, Any]) -> None:
            out = merger.feed(node, line)
            if out is not None:
                await self.send_line(out)

        results = await pulls.call_nodes(self.ctx, targets, "POST", path,
                                         {**body, "stream": True},
                                         on_line if stream else None, self.cancel,
                                         expect_success=True)
        if self.cancel.cancelled:
            return
        if reprobe:
            await modelops.reprobe(self.ctx, targets)
        refused = modelops.common_refusal(results)
        if refused and not self.streaming:
            raise ApiError(*refused)
        error = modelops.failure_message(verb, targets, {i: r.error for i, r in results.items()})
        if not stream:
            if error:
                raise ApiError(500, error)
            self.write_json({"status": "success"})
            return
        await self.send_line({"error": error} if error else {"status": "success"})
        self.end()


class ProxyPullHandler(ModelOpHandler):
    @admin_required
    async def post(self) -> None:
        """Pull a model on one node or on every routable node at once.
        ---
        tags: [models]
        summary: Pull a model onto the nodes
        description: >-
          With `stream` (the default) the answer is NDJSON, each node's Ollama
          progress lines tagged with `node_id` and `node` as they arrive, then one summary
          line (`done: true`). Without it, the summary alone, 200 when every node succeeded,
          502 otherwise. Nodes that are down are skipped unless named by `node_id`.
        security: [{bearerAuth: []}]
        requestBody: {required: true, content: {application/json: {schema: PullInput}}}
        responses:
          200:
            description: Progress then summary (stream), or the summary
            content:
              application/x-ndjson: {schema: PullProgress}
              application/json: {schema: PullSummary}
          400: BadRequest
          401: Unauthorized
          404: NotFound
          502: {description: The pull failed on some node, content: {application/json: {schema: PullSummary}}}
          503: Unavailable
        """
        body = await self.request_body()
        model = _model(body, "model")
        stream = body.get("stream") is not False
        insecure = body.get("insecure") is True
        wanted = body.get("node_id")
        if wanted is None:
            targets = self.routable()
        elif isinstance(wanted, bool) or not isinstance(wanted, int):
            raise ApiError(400, "invalid value for 'node_id': expected an integer")
        elif wanted not in self.ctx.registry.nodes:
            raise ApiError(404, f"node {wanted} not found")
        else:
            targets = [self.ctx.registry.nodes[wanted]]

        async def tagged(node: NodeState, line: dict[str, Any]) -> None:
            await self.send_line({"node_id": node.id, "node": node.name,
                                  **{k: v for k, v in line.items() if k not in ("node_id", "node")}})

        on_progress: Callable[[NodeState, dict], Awaitable[None] | None]
        on_progress = tagged if stream else (lambda node, line: None)
        results = await pulls.pull(self.ctx, model, targets, on_progress, insecure=insecure,
                                   cancel=self.cancel)
        if self.cancel.cancelled:
            return
        await modelops.reprobe(self.ctx, targets)
        error = modelops.failure_message("pull", targets,
                                         {i: r.get("error") for i, r in results.items()})
        summary: dict[str, Any] = {
            "done": True, "model": model, "status": "error" if error else "success",
            "results": [{"node_id": n.id, "node": n.name, **results[n.id]} for n in targets]}
        if error:
            summary["error"] = error
        if stream:
            await self.send_line(summary)
            self.end()
        else:
            self.write_json(summary, 502 if error else 200)


class PullHandler(ModelOpHandler):
    @admin_required
    async def post(self) -> None:
        """Ollama's pull, on every routable node.
        ---
        tags: [ollama]
        summary: Pull a model onto every node (Ollama API)
        description: >-
          One merged Ollama progress stream (a layer's counts summed over the
          nodes); the last line is `{"status":"success"}` only if every node succeeded, else
          an `{"error"}` line naming the failed nodes.
        security: [{bearerAuth: []}]
        requestBody: {required: true, content: {application/json: {schema: OllamaModelInput}}}
        responses:
          200: {description: Progress (NDJSON) or the result, content: {application/x-ndjson: {schema: OllamaProgress}}}
          400: BadRequest
          401: Unauthorized
          500: ServerError
          503: Unavailable
        """
        body = await self.request_body()
        _model(body)
        await self.progress_op("pull", "/api/pull", body, self.routable(),
                               body.get("stream") is not False)


class CreateHandler(ModelOpHandler):
    @admin_required
    async def post(self) -> None:
        """Ollama's create, on the nodes that have `from` (else every routable node).
        ---
        tags: [ollama]
        summary: Create a model on the nodes (Ollama API)
        security: [{bearerAuth: []}]
        requestBody: {required: true, content: {application/json: {schema: OllamaCreateInput}}}
        responses:
          200: {description: Progress (NDJSON) or the result, content: {application/x-ndjson: {schema: OllamaProgress}}}
          400: BadRequest
          401: Unauthorized
          500: ServerError
          503: Unavailable
        """
        body = await self.request_body()
        _model(body)
        source = body.get("from")
        targets = []
        if source:
            try:
                targets = modelops.having(self.ctx, source)
            except modelnames.InvalidModelName:
                pass  # a file path or blob: every node
        await self.progress_op("create", "/api/create", body, targets or self.routable(),
                               body.get("stream") is not False)


class PushHandler(ModelOpHandler):
    @admin_required
    async def post(self) -> None:
        """Ollama's push, from the node with the newest copy of the model.
        ---
        tags: [ollama]
        summary: Push a model to its registry (Ollama API)
        security: [{bearerAuth: []}]
        requestBody: {required: true, content: {application/json: {schema: OllamaModelInput}}}
        responses:
          200: {description: Progress (NDJSON) or the result, content: {application/x-ndjson: {schema: OllamaProgress}}}
          400: BadRequest
          401: Unauthorized
          404: NotFound
          500: ServerError
        """
        body = await self.request_body()
        model = _model(body)
        nodes = modelops.having(self.ctx, model)
        if not nodes:
            raise ApiError(404, f'model "{model[:200]}" not found')
        await self.progress_op("push", "/api/push", body, [modelops.newest_copy(nodes, model)],
                               body.get("stream") is not False, reprobe=False)


class CopyHandler(ModelOpHandler):
    @admin_required
    async def post(self) -> None:
        """Ollama's copy, on every node that has the source model.
        ---
        tags: [ollama]
        summary: Copy a model on the nodes (Ollama API)
        security: [{bearerAuth: []}]
        requestBody: {required: true, content: {application/json: {schema: OllamaCopyInput}}}
        responses:
          200: {description: Copied (empty body)}
          400: BadRequest
          401: Unauthorized
          404: NotFound
          500: ServerError
        """
        body = await self.request_body()
        names = {}
        for role in ("source", "destination"):
            value = body.get(role) or ""
            try:
                modelnames.canonical(value)
            except modelnames.InvalidModelName:
                raise ApiError(400, f'{role} "{value[:200]}" is invalid') from None
            names[role] = value
        targets = modelops.having(self.ctx, names["source"])
        if not targets:
            raise ApiError(404, f'model "{names["source"][:200]}" not found')
        results = await pulls.call_nodes(self.ctx, targets, "POST", "/api/copy", body, None,
                                         self.cancel, expect_success=False)
        if self.cancel.cancelled:
            return
        await modelops.reprobe(self.ctx, targets)
        refused = modelops.common_refusal(results)
        if refused:
            raise ApiError(*refused)
        error = modelops.failure_message("copy", targets,
                                         {i: r.error for i, r in results.items()})
        if error:
            raise ApiError(500, error)
        self.end()


class DeleteHandler(ModelOpHandler):
    @admin_required
    async def delete(self) -> None:
        """Ollama's delete, on every routable node.
        ---
        tags: [ollama]
        summary: Delete a model from every node (Ollama API)
        description: 200 with an empty body when some node deleted it, 404 when none had it.
        security: [{bearerAuth: []}]
        requestBody: {required: true, content: {application/json: {schema: OllamaModelInput}}}
        responses:
          200: {description: Deleted (empty body)}
          400: BadRequest
          401: Unauthorized
          404: NotFound
          500: ServerError
          503: Unavailable
        """
        body = await self.request_body()
        _model(body)
        targets = self.routable()
        results = await pulls.call_nodes(self.ctx, targets, "DELETE", "/api/delete", body, None,
                                         self.cancel, expect_success=False)
        if self.cancel.cancelled:
            return
        await modelops.reprobe(self.ctx, targets)
        refused = modelops.common_refusal(results)
        if any(r.ok for r in results.values()):
            self.end()
        elif refused:  # e.g. 404 when no node had the model
            raise ApiError(*refused)
        else:
            raise ApiError(500, modelops.failure_message(
                "delete", targets, {i: r.error for i, r in results.items()}))
