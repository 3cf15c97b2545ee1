"""`HEAD|POST /api/blobs/sha256:<hex>`: blobs on every node, admin only."""
from __future__ import annotations


import tornado.web

from ..modelops import blobs
from ..auth import admin_required
from ..modelops import common_refusal, failure_message
from ..errors import ApiError
from .base import BaseHandler

# A GGUF file is gigabytes: uploads are streamed, so their bound is far above
# the one for JSON bodies.
MAX_BLOB_SIZE = 1 << 40


@tornado.web.stream_request_body
class BlobHandler(BaseHandler):
    # GGUF files are gigabytes; each chunk goes on to the nodes, never kept.
    max_body = MAX_BLOB_SIZE
    holds_body = False
    upload: blobs.BlobUpload | None = None

    @admin_required
    def prepare(self) -> None:
        # Checked before the first body byte arrives: a refused upload is
        # never sent anywhere.
        digest = blobs.parse_digest(self.path_kwargs.get("digest", ""))
        if digest is None:
            raise ApiError(400, "invalid digest format")
        nodes = sorted(self.ctx.registry.routable(), key=lambda n: n.id)
        if not nodes:
            raise ApiError(503, "no node is available")
        self.digest, self.nodes = digest, nodes
        if self.request.method == "POST":
            self.request.connection.set_max_body_size(MAX_BLOB_SIZE)
            self.upload = blobs.BlobUpload(self.ctx.relay, nodes, digest,
                                           self.request.headers.get("Content-Length"))

    async def data_received(self, chunk: bytes) -> None:
        if self.upload is not None:
            await self.upload.feed(chunk)

    def on_connection_close(self) -> None:
        if self.upload is not None:
            self.upload.abort()

    async def head(self, digest: str) -> None:
        """Whether every routable node has a blob (Ollama API).
        ---
        tags: [ollama]
        summary: Check a blob on every node (Ollama API)
        description: 200 only when every routable node has the blob, else 404.
        security: [{bearerAuth: []}]
        parameters:
          - {name: digest, in: path, required: true, schema: {type: string, pattern: "^sha256[:-][0-9a-fA-F]{64}$"}}
        responses:
          200: {description: Every node has the blob}
          400: BadRequest
          401: Unauthorized
          404: NotFound
          503: Unavailable
        """
        codes = await blobs.check_blob(self.ctx.relay, self.nodes, self.digest,
                                     self.ctx.settings.probe_timeout)
        missing = [n.name for n in self.nodes if codes[n.id] != 200]
        if missing:
            raise ApiError(404, f'blob "{self.digest}" not found on node(s) '
                                + ", ".join(missing))
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish()

    async def post(self, digest: str) -> None:
        """Upload a blob to every routable node at once (Ollama API).
        ---
        tags: [ollama]
        summary: Upload a blob to every node (Ollama API)
        description: >-
          The body is streamed to every routable node as it arrives and its sha256 is
          checked; 201 when every node stored it (200 when every node had it already),
          400 on a digest mismatch (then no node keeps it), 502 naming the nodes that failed.
        security: [{bearerAuth: []}]
        parameters:
          - {name: digest, in: path, required: true, schema: {type: string, pattern: "^sha256[:-][0-9a-fA-F]{64}$"}}
        requestBody: {required: true, content: {application/octet-stream: {schema: {type: string, format: binary}}}}
        responses:
          200: {description: Every node had the blob already}
          201: {description: Every node stored the blob}
          400: BadRequest
          401: Unauthorized
          502: {description: The upload failed on some node, content: {application/json: {schema: Error}}}
          503: Unavailable
        """
        assert self.upload is not None
        actual, results = await self.upload.finish()
        if actual != self.digest:
            raise ApiError(400, f'digest mismatch, expected "{self.digest}", got "{actual}"')
        refused = common_refusal(results)
        if refused:
            raise ApiError(*refused)
        error = failure_message("blob upload", self.nodes,
                                {node_id: r.error for node_id, r in results.items()})
        if error:
            raise ApiError(502, error)
        created = any(r.code == 201 for r in results.values())
        self.set_status(201 if created else 200)
        self.finish()

