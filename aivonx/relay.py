"""One client request relayed to an upstream node, chunk by chunk.

The relay owns the upstream exchange: it forwards each chunk as it arrives,
fails over to the next candidate before the first byte reaches the client,
ends a broken stream with an explicit error, and closes the upstream
connection the moment the client goes away (that is what stops the GPU).

AsyncHTTPClient has no public cancel, and closing it only takes effect at
the next chunk; the client in aivonx.upstream records each request's TCP
stream in a per-request handle, so a cancel closes the socket at once, even
while the node is silent during a model load.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Protocol

from tornado import httputil
from tornado.httpclient import HTTPResponse
from tornado.ioloop import IOLoop

from .errors import error_body, stream_error_chunk
from .registry import NodeState, Registry
from .upstream import ConnectionHandle, UpstreamRequest, make_upstream_client

log = logging.getLogger("aivonx.relay")

# Headers that describe one hop, never forwarded (RFC 9110 section 7.6.1),
# plus what the proxy itself must set for the upstream or the client.
HOP_BY_HOP = frozenset(h.lower() for h in (
    "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization",
    "Proxy-Connection", "TE", "Trailer", "Transfer-Encoding", "Upgrade",
))
# The client's credentials (a bearer token, Anthropic clients' x-api-key,
# cookies) are for the proxy, not the nodes; the Host sent
# upstream must be the node's own (a loopback-bound Ollama answers 403 to
# foreign hosts); the body length and encoding are the relay's business.
NOT_FORWARDED_UP = HOP_BY_HOP | {"host", "authorization", "x-api-key", "cookie",
                                 "content-length", "accept-encoding", "expect"}
NOT_FORWARDED_DOWN = HOP_BY_HOP | {"date", "server"}

# Upstream answers that mean "try another node" when nothing has reached
# the client yet: the node lacks the model after all, is overloaded, or
# failed to load or run it.
RETRYABLE_STATUS = frozenset({404, 429, 500, 502, 503, 504})
BUSY_STATUS = frozenset({429, 503})
MAX_BUFFERED_ERROR = 64 * 1024


class Sink(Protocol):
    """What the relay writes to: a tornado RequestHandler fits."""

    def set_status(self, status_code: int, reason: str | None = None) -> None: ...
    def set_header(self, name: str, value: Any) -> None: ...
    def clear_header(self, name: str) -> None: ...
    def write(self, chunk: bytes) -> None: ...
    def flush(self) -> Any: ...


class Attempt:
    """One try of one node: collects the head, then forwards or buffers."""

    def __init__(self, exchange: "Exchange", node: NodeState, can_retry: bool) -> None:
        self.exchange = exchange
        self.node = node
        self.can_retry = can_retry
        self.handle = ConnectionHandle()
        self.status: int | None = None
        self.reason = ""
        self.headers = httputil.HTTPHeaders()
        self.forwarding = False   # True once the head went to the client
        self.error_buffer = bytearray()
        self.started = time.monotonic()
        self.first_chunk_at: float | None = None
        self.last_activity = self.started

    def on_head(self, status: int, reason: str, headers: httputil.HTTPHeaders) -> None:
        self.last_activity = time.monotonic()
        self.status, self.reason, self.headers = status, reason, headers
        if status in BUSY_STATUS:
            self.exchange.relay.node_busy(self.node, headers.get("Retry-After"))
        if self.can_retry and status in RETRYABLE_STATUS:
            return  # buffer the body; the exchange decides on failover
        self.forwarding = True
        self.exchange.send_head(self, status, reason, headers)

    async def on_chunk(self, chunk: bytes) -> None:
        self.last_activity = time.monotonic()
        if self.exchange.cancelled:
            return
        if not self.forwarding:
            room = MAX_BUFFERED_ERROR - len(self.error_buffer)
            if room > 0:
                self.error_buffer += chunk[:room]
            return
        if self.first_chunk_at is None:
            self.first_chunk_at = self.last_activity
        await self.exchange.send_chunk(chunk)


class Exchange:
    """A client request relayed to the first node that takes it.

    Nodes come from the scheduler one at a time, each with a reserved slot;
    a node that fails before anything reached the client is excluded and the
    next one is asked for, waiting in the queue if all are busy.
    """

    def __init__(self, relay: "Relay", sink: Sink, method: str, path: str,
                 headers: httputil.HTTPHeaders, body: bytes | None,
                 style: str = "ollama", model: str = "", received_at: float | None = None) -> None:
        self.relay = relay
        self.sink = sink
        self.method = method
        self.path = path
        self.up_headers = {k: v for k, v in headers.get_all()
                           if k.lower() not in NOT_FORWARDED_UP}
        self.up_headers["Connection"] = "keep-alive"
        self.body = body
        self.style = style
        self.model = model
        self.received_at = time.monotonic() if received_at is None else received_at
        self.queued = 0.0
        self.cancelled = False
        self.gone: asyncio.Future = asyncio.get_running_loop().create_future()
        self.attempt: Attempt | None = None
        self.content_type = ""

    def cancel(self) -> None:
        """The client went away: close the upstream connection now."""
        self.cancelled = True
        if not self.gone.done():
            self.gone.set_result(None)
        if self.attempt is not None:
            self.attempt.handle.close("client disconnected")

    def send_head(self, attempt: Attempt, status: int, reason: str,
                  headers: httputil.HTTPHeaders) -> None:
        sink = self.sink
        sink.set_status(status, reason or None)
        sink.clear_header("Content-Type")
        for name, value in headers.get_all():
            if name.lower() not in NOT_FORWARDED_DOWN:
                sink.set_header(name, value)
        # Which node answered, and what the proxy itself cost (queueing and
        # the node's own time excluded).
        overhead = (attempt.started - self.received_at - self.queued
                    + time.monotonic() - attempt.last_activity)
        sink.set_header("X-Aivonx-Node", attempt.node.header_name)
        sink.set_header("X-Aivonx-Overhead-Ms", f"{max(overhead, 0.0) * 1000:.3f}")
        self.relay.metrics.overhead.observe((), max(overhead, 0.0))
        self.content_type = headers.get("Content-Type", "")

    async def send_chunk(self, chunk: bytes) -> None:
        self.sink.write(chunk)
        await self.sink.flush()

    def _more_candidates(self, key: str, tried: set[int]) -> bool:
        try:
            return any(n.id not in tried for n in self.relay.router.eligible(key))
        except (LookupError, RuntimeError):
            return False

    async def _next_node(self, key: str, tried: set[int]) -> NodeState | None:
        scheduler = self.relay.scheduler
        asked = time.monotonic()
        try:
            return await scheduler.acquire(key, tried, self.gone)
        finally:
            waited = time.monotonic() - asked
            self.queued += waited
            if waited > 0.0005:
                self.relay.metrics.queue_wait.observe((), waited)

    async def run(self, key: str) -> None:
        """Relay the request to the best node for the model `key`.

        The first node is asked for outside any try: NoSuchModel,
        NoHealthyNode, QueueFull and QueueTimeout reach the caller, which
        answers them. Later failures end with the last node's answer or a
        503 written here."""
        tried: set[int] = set()
        node = await self._next_node(key, tried)
        last: Attempt | None = None
        last_error = "no node available"
        while node is not None and not self.cancelled:
            tried.add(node.id)
            attempt = Attempt(self, node, self._more_candidates(key, tried))
            self.attempt = attempt
            response = await self.relay.fetch(self, attempt)
            if self.cancelled:
                return
            if attempt.forwarding:
                await self._finish_stream(attempt, response)
                return
            # Nothing reached the client: note why, and try the next node.
            if attempt.status is not None:
                last = attempt
                last_error = f"node {node.name} answered {attempt.status}"
                if attempt.status == 404:
                    self.relay.model_missing(node)
            else:
                last_error = f"node {node.name} failed: {describe_failure(response, attempt.handle)}"
                self.relay.node_failed(node, last_error)
            self.relay.metrics.failure(node.name, self.model, "status" if attempt.status
                                       else "connect")
            log.info("failing over from %s: %s", node.name, last_error)
            try:
                node = await self._next_node(key, tried)
            except (LookupError, RuntimeError):
                node = None
        if self.cancelled:
            return
        if last is not None and last.status is not None:
            # Every node refused: pass the last node's own answer through.
            self.send_head(last, last.status, last.reason, last.headers)
            self.sink.clear_header("Content-Length")
            if last.error_buffer:
                self.sink.write(bytes(last.error_buffer))
            return
        self.write_error(503, f"no node could serve the request ({last_error})")

    async def _finish_stream(self, attempt: Attempt, response: HTTPResponse) -> None:
        if response.code != 599:
            return
        node = attempt.node
        message = (f"upstream node {node.name} failed mid-response: "
                   f"{describe_failure(response, attempt.handle)}")
        log.warning(message)
        self.relay.metrics.failure(node.name, self.model, "midstream")
        self.relay.transport_failed(node, message)
        chunk = stream_error_chunk(self.content_type, message, self.style)
        if chunk is not None:
            try:
                await self.send_chunk(chunk)
            except Exception:  # the client may be gone as well
                pass
        else:
            # A fixed-length body cannot be completed: cut the connection so
            # the client sees a short read rather than a corrupt document.
            conn = getattr(getattr(self.sink, "request", None), "connection", None)
            if conn is not None:
                conn.close()

    def write_error(self, status: int, message: str) -> None:
        """An error produced by the proxy itself, in the client's dialect."""
        sink = self.sink
        sink.set_status(status)
        sink.set_header("Content-Type", "application/json; charset=utf-8")
        if status >= 500:
            # The openai SDK resends 5xx by itself; every node was tried already.
            sink.set_header("x-should-retry", "false")
        sink.write(error_body(self.style, message, status))


def describe_failure(response: HTTPResponse, handle: ConnectionHandle) -> str:
    if handle.closed_reason is not None:
        return handle.closed_reason
    error = response.error
    if error is None:
        return f"status {response.code}"
    return str(error) or error.__class__.__name__


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class Relay:
    """Shared relay machinery: the upstream client, timeouts, bookkeeping."""

    def __init__(self, registry: Registry, router: Any, scheduler: Any, metrics: Any, *,
                 connect_timeout: float, idle_timeout: float, max_body_size: int) -> None:
        self.registry = registry
        self.router = router
        self.scheduler = scheduler
        self.metrics = metrics
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.client = make_upstream_client(max_body_size)
        # Set by the app: re-probe a node whose model list proved stale.
        self.on_missing_model: Callable[[NodeState], None] | None = None

    def node_failed(self, node: NodeState, reason: str) -> None:
        """A request could not reach the node: take it out of the pool now,
        without waiting for the next probe."""
        self.registry.mark_down(node, reason)
        self.transport_failed(node, reason)

    def transport_failed(self, node: NodeState, reason: str) -> None:
        if self.registry.transport_failed(node, reason):
            log.warning("circuit opened for node %s: %s", node.name, node.reason)

    def node_busy(self, node: NodeState, retry_after: str | None) -> None:
        self.registry.busy(node, _retry_after(retry_after))

    def model_missing(self, node: NodeState) -> None:
        if self.on_missing_model is not None:
            self.on_missing_model(node)

    async def _send(self, exchange: Exchange, attempt: Attempt) -> HTTPResponse:
        request = UpstreamRequest(
            attempt.node.url + exchange.path, attempt.handle, attempt.on_head,
            method=exchange.method,
            headers=exchange.up_headers,
            body=exchange.body,
            connect_timeout=self.connect_timeout,
            request_timeout=0,  # no total deadline: the idle watchdog instead
            streaming_callback=attempt.on_chunk,
            decompress_response=False,
            follow_redirects=False,
            allow_nonstandard_methods=True,
        )
        try:
            return await self.client.fetch(request, raise_error=False)
        except Exception as exc:  # refused, reset, DNS: no HTTP answer at all
            # Without its traceback the error does not pin this frame (and
            # the whole exchange) in memory.
            return HTTPResponse(request, 599, error=exc.with_traceback(None))

    async def fetch(self, exchange: Exchange, attempt: Attempt) -> HTTPResponse:
        """One upstream exchange on the node the scheduler reserved."""
        node = attempt.node
        watchdog = IdleWatchdog(attempt, self.idle_timeout)
        ok = False
        try:
            response = await self._send(exchange, attempt)
            if (response.code == 599 and attempt.handle.reused and attempt.status is None
                    and not exchange.cancelled and attempt.handle.closed_reason is None):
                # A kept-alive connection the node had already closed: that
                # says nothing about the node. Once more on a new connection.
                attempt.handle = ConnectionHandle(fresh_only=True)
                response = await self._send(exchange, attempt)
            ok = response.code != 599 or exchange.cancelled
            return response
        finally:
            watchdog.stop()
            self.scheduler.release(node, ok)
            if attempt.forwarding:
                now = time.monotonic()
                ttft = None if attempt.first_chunk_at is None else (
                    attempt.first_chunk_at - attempt.started)
                self.metrics.request_done(node.name, exchange.model, attempt.status or 599,
                                          now - attempt.started, ttft)

    def close(self) -> None:
        self.client.close()


class IdleWatchdog:
    """Closes the upstream connection when no byte arrived for `timeout`
    seconds. One timer per request, re-armed lazily, not per chunk."""

    def __init__(self, attempt: Attempt, timeout: float) -> None:
        self.attempt = attempt
        self.timeout = timeout
        self.loop = IOLoop.current()
        self.timer = self.loop.call_later(timeout, self._check)

    def _check(self) -> None:
        idle = time.monotonic() - self.attempt.last_activity
        if idle >= self.timeout:
            self.attempt.handle.close(f"no data from node for {self.timeout:g} s")
            self.timer = None
        else:
            self.timer = self.loop.call_later(self.timeout - idle, self._check)

    def stop(self) -> None:
        if self.timer is not None:
            self.loop.remove_timeout(self.timer)
            self.timer = None
