"""Model operations across the cluster, admin only.

`POST /api/proxy/pull` is the management API's pull: every node's progress
tagged with the node, then a per-node summary. The Ollama-native
`/api/pull`, `/api/delete`, `/api/copy`, `/api/create` and `/api/push` keep
Ollama's request and answer shapes, so `ollama pull` and the SDKs work
against the cluster as against one node.
"""
from __future__ import annotations

import json
from typing import Any

from tornado.iostream import StreamClosedError

from .. import modelnames
from ..auth import admin_required
from ..context import Context
from ..errors import ApiError
from ..modelops import Cancel, NoNodeAvailable, OpResult, UnknownModel
from ..registry import NodeState
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

    body_errors_have_fields = False

    def initialize(self, ctx: Context) -> None:
        super().initialize(ctx)
        self.cancel = Cancel()
        self.streaming = False

    def on_connection_close(self) -> None:
        super().on_connection_close()
        self.cancel.cancel()

    def _handle_request_exception(self, e: BaseException) -> None:
        if isinstance(e, NoNodeAvailable):
            e = ApiError(503, "no node is available")
        elif isinstance(e, UnknownModel):
            e = ApiError(404, f'model "{e.name[:200]}" not found')
        super()._handle_request_exception(e)

    async def request_body(self) -> dict[str, Any]:
        """The JSON body, with the fields read here of the right types."""
        body = await self.json_body()
        check_types(body, FIELDS)
        return body

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

    def stream_wanted(self, body: dict[str, Any]) -> bool:
        return body.get("stream") is not False

    async def answer_progress(self, result: OpResult, stream: bool) -> None:
        """The end of a merged progress stream: success only if every node
        succeeded; a refusal every node made alike keeps its status while
        nothing was sent yet."""
        if result.cancelled:
            return
        if not result.ok and result.refusal and not self.streaming:
            raise ApiError(result.status, result.message)
        if not stream:
            if not result.ok:
                raise ApiError(500, result.error or "")
            self.write_json({"status": "success"})
            return
        await self.send_line({"error": result.error} if not result.ok else {"status": "success"})
        self.end()

    def answer_empty(self, result: OpResult) -> None:
        """Copy and delete answer 200 with an empty body, as Ollama does."""
        if result.cancelled:
            return
        if not result.ok:
            raise ApiError(result.status, result.message)
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
        stream = self.stream_wanted(body)
        wanted = body.get("node_id")
        if wanted is None:
            targets = self.ctx.modelops.serving()
        elif isinstance(wanted, bool) or not isinstance(wanted, int):
            raise ApiError(400, "invalid value for 'node_id': expected an integer")
        elif wanted not in self.ctx.registry.nodes:
            raise ApiError(404, f"node {wanted} not found")
        else:
            targets = [self.ctx.registry.nodes[wanted]]

        async def tagged(node: NodeState, line: dict[str, Any]) -> None:
            await self.send_line({"node_id": node.id, "node": node.name,
                                  **{k: v for k, v in line.items() if k not in ("node_id", "node")}})

        result = await self.ctx.modelops.pull(model, targets, tagged if stream else None,
                                              insecure=body.get("insecure") is True,
                                              cancel=self.cancel)
        if result.cancelled:
            return
        summary = result.summary(model)
        if stream:
            await self.send_line(summary)
            self.end()
        else:
            self.write_json(summary, 200 if result.ok else 502)


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
          200:
            description: Progress (NDJSON), or the result with `stream` false
            content:
              application/x-ndjson: {schema: OllamaProgress}
              application/json: {schema: OllamaProgress}
          400: BadRequest
          401: Unauthorized
          500: ServerError
          503: Unavailable
        """
        body = await self.request_body()
        _model(body)
        stream = self.stream_wanted(body)
        result = await self.ctx.modelops.ollama_pull(body, self.send_line if stream else None,
                                                     self.cancel)
        await self.answer_progress(result, stream)


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
          200:
            description: Progress (NDJSON), or the result with `stream` false
            content:
              application/x-ndjson: {schema: OllamaProgress}
              application/json: {schema: OllamaProgress}
          400: BadRequest
          401: Unauthorized
          404: NotFound
          500: ServerError
          503: Unavailable
        """
        body = await self.request_body()
        _model(body)
        stream = self.stream_wanted(body)
        result = await self.ctx.modelops.create(body, self.send_line if stream else None,
                                                self.cancel)
        await self.answer_progress(result, stream)


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
          200:
            description: Progress (NDJSON), or the result with `stream` false
            content:
              application/x-ndjson: {schema: OllamaProgress}
              application/json: {schema: OllamaProgress}
          400: BadRequest
          401: Unauthorized
          404: NotFound
          500: ServerError
        """
        body = await self.request_body()
        model = _model(body)
        stream = self.stream_wanted(body)
        result = await self.ctx.modelops.push(body, model, self.send_line if stream else None,
                                              self.cancel)
        await self.answer_progress(result, stream)


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
        for role in ("source", "destination"):
            value = body.get(role) or ""
            try:
                modelnames.canonical(value)
            except modelnames.InvalidModelName:
                raise ApiError(400, f'{role} "{value[:200]}" is invalid') from None
        self.answer_empty(await self.ctx.modelops.copy(body, body["source"], self.cancel))


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
        self.answer_empty(await self.ctx.modelops.delete(body, self.cancel))
