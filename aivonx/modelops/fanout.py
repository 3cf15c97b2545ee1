"""One request to each of several nodes at once, each node's result kept.

Every node gets its own streaming request on the relay's upstream client,
so no thread waits on a node and each NDJSON line is handed over as it
arrives. There is no total deadline (a pull of a 40 GB model takes as long
as it takes): a connect timeout plus the relay's idle timeout. A Cancel
closes every upstream connection of an operation at once, which is what
stops the nodes' work when the client goes away.
"""
from __future__ import annotations

import asyncio
import inspect
import json
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from tornado.httpclient import AsyncHTTPClient, HTTPResponse

from ..registry import NodeState
from ..relay import IdleWatchdog, describe_failure
from ..relay.upstream import ConnectionHandle, UpstreamRequest

# Progress lines are small; a node sending megabytes without a newline is
# broken, and nothing a node sends is trusted.
MAX_LINE = 1024 * 1024

OnLine = Callable[[NodeState, dict[str, Any]], "Awaitable[None] | None"]


class Cancel:
    """Closes the upstream connections of one operation, now or as soon as
    they are opened."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._handles: list[ConnectionHandle] = []

    @property
    def cancelled(self) -> bool:
        return self.reason is not None

    def handle(self) -> ConnectionHandle:
        handle = ConnectionHandle()
        if self.reason is not None:
            handle.close(self.reason)
        self._handles.append(handle)
        return handle

    def cancel(self, reason: str = "client disconnected") -> None:
        if self.reason is None:
            self.reason = reason
        for handle in self._handles:
            handle.close(reason)


@dataclass
class NodeResult:
    """How one node's part went: `code` is its HTTP status (None when it
    could not be reached), `error` None on success."""
    code: int | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def as_dict(self) -> dict[str, str]:
        return {"status": "success"} if self.error is None else {"error": self.error}


class _Lines:
    """Splits a byte stream into JSON objects, one per line."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.too_long = False

    def feed(self, chunk: bytes) -> list[dict[str, Any]]:
        self.buffer += chunk
        *lines, rest = self.buffer.split(b"\n")
        self.buffer = bytearray(rest)
        if len(self.buffer) > MAX_LINE:
            self.too_long = True
            self.buffer.clear()
        return [obj for obj in map(_parse, lines) if obj is not None]

    def end(self) -> list[dict[str, Any]]:
        rest, self.buffer = bytes(self.buffer), bytearray()
        obj = _parse(rest)
        return [obj] if obj is not None else []


def _parse(line: bytes) -> dict[str, Any] | None:
    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


class _Activity:
    """What the relay's idle watchdog reads: last byte time and the handle."""

    def __init__(self, handle: ConnectionHandle) -> None:
        self.handle = handle
        self.last_activity = time.monotonic()


class FanOut:
    """Sends one request to each of a set of nodes and collects, per node,
    how it went. Model operations use it; so can anything else that must
    reach several nodes at once."""

    def __init__(self, client: AsyncHTTPClient, *, connect_timeout: float,
                 idle_timeout: float) -> None:
        self.client = client
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout

    async def call_node(self, node: NodeState, method: str, path: str,
                        body: dict[str, Any] | bytes | None, on_line: OnLine | None,
                        cancel: Cancel, *, expect_success: bool) -> NodeResult:
        """One request to one node, its NDJSON answer handed to `on_line`
        line by line. With expect_success (progress streams), only a final
        `{"status": "success"}` line counts as success; otherwise a 200."""
        lines = _Lines()
        seen: dict[str, Any] = {"success": False, "error": None}
        activity = _Activity(cancel.handle())

        async def deliver(objs: list[dict[str, Any]]) -> None:
            for obj in objs:
                if isinstance(obj.get("error"), str) and seen["error"] is None:
                    seen["error"] = obj["error"][:1000]
                elif obj.get("status") == "success":
                    seen["success"] = True
                if on_line is not None:
                    result = on_line(node, obj)
                    if inspect.isawaitable(result):
                        await result

        async def on_chunk(chunk: bytes) -> None:
            activity.last_activity = time.monotonic()
            if not cancel.cancelled:
                await deliver(lines.feed(chunk))

        request = UpstreamRequest(
            node.url + path, activity.handle, method=method,
            headers={"Content-Type": "application/json", "Accept": "application/x-ndjson"},
            body=json.dumps(body) if isinstance(body, dict) else body,
            connect_timeout=self.connect_timeout, request_timeout=0,
            streaming_callback=on_chunk, decompress_response=False, follow_redirects=False,
            allow_nonstandard_methods=True)
        watchdog = IdleWatchdog(activity, self.idle_timeout)  # type: ignore[arg-type]
        try:
            try:
                response = await self.client.fetch(request, raise_error=False)
            except Exception as exc:  # refused, reset, DNS: no HTTP answer at all
                response = HTTPResponse(request, 599, error=exc.with_traceback(None))
        finally:
            watchdog.stop()
        if cancel.cancelled:
            return NodeResult(None, f"cancelled: {cancel.reason}")
        if response.code == 599:
            return NodeResult(None, describe_failure(response, activity.handle))
        await deliver(lines.end())
        if lines.too_long:
            return NodeResult(response.code, "node sent a line longer than 1 MiB")
        if seen["error"] is not None:
            return NodeResult(response.code, seen["error"])
        if response.code != 200:
            return NodeResult(response.code, f"node answered {response.code}")
        if expect_success and not seen["success"]:
            return NodeResult(response.code, "the node's stream ended before success")
        return NodeResult(response.code)

    async def call_nodes(self, nodes: list[NodeState], method: str, path: str,
                         body: dict[str, Any] | bytes | None, on_line: OnLine | None,
                         cancel: Cancel, *, expect_success: bool) -> dict[int, NodeResult]:
        """call_node on every node concurrently; results by node id."""
        results = await asyncio.gather(*(
            self.call_node(node, method, path, body, on_line, cancel,
                           expect_success=expect_success)
            for node in nodes))
        return {node.id: result for node, result in zip(nodes, results)}
