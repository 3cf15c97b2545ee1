"""Blob uploads to every node at once, streamed, never held whole in memory.

`ollama create` from a GGUF file (and Open WebUI's upload) first sends the file
to `POST /api/blobs/sha256:<hex>`, then `/api/create` with `files` naming the
digest. For the created model to be routable anywhere, every node needs the
blob: each chunk the client sends is handed to one upstream request per node
(a bounded queue each, so the slowest node paces the upload instead of memory
growing), and the digest is checked here as the bytes pass. A mismatch aborts
the upstream requests before their end, so no node stores a wrong blob.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from typing import Any, Awaitable, Callable

from tornado.httpclient import HTTPResponse

from ..registry import NodeState
from ..relay import IdleWatchdog, Relay, describe_failure
from ..relay.upstream import UpstreamRequest
from .fanout import Cancel, NodeResult

DIGEST = re.compile(r"sha256[:-]([0-9a-fA-F]{64})")
QUEUE_CHUNKS = 8  # per node: at most this many chunks (64 KiB each) wait for a slow node


def parse_digest(text: str) -> str | None:
    """`sha256:<hex>` (Ollama also accepts `sha256-`), lower-cased; None if invalid."""
    match = DIGEST.fullmatch(text)
    return f"sha256:{match.group(1).lower()}" if match else None


class _Abort(Exception):
    """Raised in a body producer: the upload must not complete on the node."""


_END, _ABORT = object(), object()


class _Feed:
    """One node's share of the upload: a bounded queue read by its request body."""

    def __init__(self, node: NodeState, handle: Any) -> None:
        self.node = node
        self.handle = handle
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=QUEUE_CHUNKS)
        self.task: asyncio.Future | None = None
        self.last_activity = time.monotonic()  # read by the idle watchdog

    async def put(self, item: object) -> None:
        """Queue an item unless the node's request already ended (then drop it)."""
        assert self.task is not None
        if self.task.done():
            return
        put = asyncio.ensure_future(self.queue.put(item))
        await asyncio.wait([put, self.task], return_when=asyncio.FIRST_COMPLETED)
        if not put.done():
            put.cancel()

    async def produce(self, write: Callable[[bytes], Awaitable[None]]) -> None:
        while True:
            item = await self.queue.get()
            if item is _END:
                return
            if item is _ABORT:
                raise _Abort("upload aborted")
            await write(item)
            self.last_activity = time.monotonic()


class BlobUpload:
    """One client upload fanned out to `nodes`; feed() each chunk, then finish()."""

    def __init__(self, relay: Relay, nodes: list[NodeState], digest: str,
                 content_length: str | None) -> None:
        self.relay = relay
        self.digest = digest
        self.hasher = hashlib.sha256()
        self.cancel = Cancel()
        headers = {"Content-Type": "application/octet-stream"}
        if content_length is not None:
            headers["Content-Length"] = content_length
        self.done = False
        self.feeds = [_Feed(node, self.cancel.handle()) for node in nodes]
        for feed in self.feeds:
            feed.task = asyncio.ensure_future(self._send(feed, headers))

    async def _send(self, feed: _Feed, headers: dict[str, str]) -> NodeResult:
        relay = self.relay
        request = UpstreamRequest(
            f"{feed.node.url}/api/blobs/{self.digest}", feed.handle, method="POST",
            headers=headers, body_producer=feed.produce,
            connect_timeout=relay.connect_timeout, request_timeout=0,
            decompress_response=False, follow_redirects=False)
        watchdog = IdleWatchdog(feed, relay.idle_timeout)
        try:
            response = await relay.client.fetch(request, raise_error=False)
        except Exception as exc:  # refused, reset, or the producer aborted
            response = HTTPResponse(request, 599, error=exc.with_traceback(None))
        finally:
            watchdog.stop()
        if response.code == 599:
            return NodeResult(None, describe_failure(response, feed.handle))
        if response.code not in (200, 201):
            return NodeResult(response.code, _error_text(response))
        return NodeResult(response.code)

    async def feed(self, chunk: bytes) -> None:
        """Hash a chunk and queue it for every node still taking the upload."""
        self.hasher.update(chunk)
        await asyncio.gather(*(feed.put(chunk) for feed in self.feeds))

    async def finish(self) -> tuple[str, dict[int, NodeResult]]:
        """End the upload; the digest of what was received, and each node's result.
        A wrong digest aborts every node's request before it completes."""
        actual = "sha256:" + self.hasher.hexdigest()
        end = _END if actual == self.digest else _ABORT
        await asyncio.gather(*(feed.put(end) for feed in self.feeds))
        results = await asyncio.gather(*(feed.task for feed in self.feeds))
        self.done = True
        return actual, {feed.node.id: result for feed, result in zip(self.feeds, results)}

    def abort(self, reason: str = "client disconnected") -> None:
        """The client went away: close every upstream connection now. Not once
        the upload is done: its connections went back to the pool and may
        serve other requests by then."""
        if not self.done:
            self.cancel.cancel(reason)


def _error_text(response: HTTPResponse) -> str:
    body = response.body or b""
    try:
        message = json.loads(body).get("error")
    except (ValueError, AttributeError):
        message = None
    if isinstance(message, str) and message:
        return f"node answered {response.code}: {message[:500]}"
    return f"node answered {response.code}"


async def check_blob(relay: Relay, nodes: list[NodeState], digest: str,
                     timeout: float) -> dict[int, int | None]:
    """HEAD the blob on every node at once: each node's status (None: unreachable)."""
    cancel = Cancel()

    async def one(node: NodeState) -> int | None:
        request = UpstreamRequest(
            f"{node.url}/api/blobs/{digest}", cancel.handle(), method="HEAD",
            connect_timeout=relay.connect_timeout, request_timeout=timeout,
            decompress_response=False, follow_redirects=False)
        try:
            response = await relay.client.fetch(request, raise_error=False)
        except Exception:
            return None
        return None if response.code == 599 else response.code

    codes = await asyncio.gather(*(one(node) for node in nodes))
    return {node.id: code for node, code in zip(nodes, codes)}
