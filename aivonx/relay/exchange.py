"""One client request relayed to an upstream node, chunk by chunk.

The relay owns the upstream exchange: it forwards each chunk as it arrives,
fails over to the next candidate before the first byte reaches the client,
ends a broken stream with an explicit error, and closes the upstream
connection the moment the client goes away (that is what stops the GPU).

AsyncHTTPClient has no public cancel, and closing it only takes effect at
the next chunk; the client in aivonx.relay.upstream records each request's TCP
stream in a per-request handle, so a cancel closes the socket at once, even
while the node is silent during a model load.
"""
from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import Callable, Hashable, Protocol

from tornado import httputil
from tornado.httpclient import HTTPResponse
from tornado.ioloop import IOLoop

from ..errors import out_of_descriptors
from ..metrics import Metrics
from ..prefix import RoutingHint
from ..registry import NodeState, Registry
from .resolver import Networks
from ..router import Router, Unroutable
from ..scheduler import Scheduler, Slot
from .sink import HOP_BY_HOP, ClientSink, connection_tokens
from .leanclient import LeanClient, Outcome
from .upstream import ConnectionHandle, make_upstream_client

log = logging.getLogger("aivonx.relay")

# The client's credentials (a bearer token, Anthropic clients' x-api-key,
# cookies) are for the proxy, not the nodes; the Host sent upstream must be
# the node's own (a loopback-bound Ollama answers 403 to foreign hosts); the
# body length and encoding are the relay's business.
NOT_FORWARDED_UP = HOP_BY_HOP | {"host", "authorization", "x-api-key", "cookie",
                                 "content-length", "accept-encoding", "expect"}

# Upstream answers that mean "try another node" when nothing has reached
# the client yet: the node lacks the model after all, is overloaded, or
# failed to load or run it.
RETRYABLE_STATUS = frozenset({404, 429, 500, 502, 503, 504})
BUSY_STATUS = frozenset({429, 503})
MAX_BUFFERED_ERROR = 64 * 1024


def upstream_headers(headers: httputil.HTTPHeaders) -> bytes:
    """The client's header lines a node gets, encoded once per request (every
    attempt sends the same ones): every value of each end-to-end header,
    nothing hop-by-hop (also what the client named in Connection)."""
    dropped = NOT_FORWARDED_UP
    if "Connection" in headers:
        dropped = dropped | connection_tokens(headers)
    lines = []
    content_type = False
    for name, value in headers.get_all():
        lower = name.lower()
        if lower in dropped:
            continue
        if "\n" in value or "\r" in value:  # Tornado's parser never lets one through
            raise ValueError(f"line break in the value of header {name}")
        content_type = content_type or lower == "content-type"
        lines.append(f"{name}: {value}\r\n")
    if not content_type:
        lines.append("Content-Type: application/json\r\n")
    lines.append("Connection: keep-alive\r\n")
    return "".join(lines).encode("latin-1")


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
        self.route = ""
        self.started = time.monotonic()
        self.first_chunk_at: float | None = None
        self.last_activity = self.started
        # How the upstream exchange ended (not its HTTPResponse, which would
        # keep the request body alive as long as the attempt).
        self.code: int | None = None
        self.error: BaseException | None = None

    def on_head(self, status: int, reason: str, headers: httputil.HTTPHeaders) -> None:
        self.last_activity = time.monotonic()
        self.status, self.reason, self.headers = status, reason, headers
        if status in BUSY_STATUS:
            self.exchange.relay.node_busy(self.node, headers.get("Retry-After"))
        if self.can_retry and status in RETRYABLE_STATUS:
            return  # buffer the body; the exchange decides on failover
        self.forwarding = True
        self.exchange.forward_head(self)

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
        observer = self.exchange.observer
        if observer is not None:
            observer.chunk(chunk)
        await self.exchange.sink.chunk(chunk)

    @property
    def failed(self) -> bool:
        """The node gave no complete answer (refused, reset, timed out, cut)."""
        return self.code is None or self.code == 599

    def ended(self, response: Outcome) -> None:
        self.code = response.code
        self.error = response.error.with_traceback(None) if response.error else None


class Observer(Protocol):
    """Sees the answer a client gets: each forwarded chunk, then its end
    (status, seconds on the node, whether the node failed). Must be cheap:
    it runs once per chunk on the event loop."""

    def chunk(self, data: bytes) -> None: ...

    def end(self, status: int, node_seconds: float, failed: bool) -> None: ...


class Exchange:
    """A client request relayed to the first node that takes it.

    Nodes come from the scheduler one at a time, each with a slot held for
    the attempt; a node that fails before anything reached the client is
    excluded and the next one is asked for, waiting in the queue if all are
    busy. `owner` and `priority` (the client's key) place it in the fair
    queue; `observer` sees what is forwarded (usage accounting).
    """

    def __init__(self, relay: "Relay", sink: ClientSink, method: str, path: str,
                 headers: httputil.HTTPHeaders, body: bytes | None,
                 model: str = "", received_at: float | None = None,
                 hint: RoutingHint | None = None, owner: Hashable = None,
                 priority: int = 1, observer: Observer | None = None) -> None:
        self.relay = relay
        self.sink = sink
        self.method = method
        self.path = path
        self.up_headers = upstream_headers(headers)
        self.body = body
        self.model = model
        self.hint = hint
        self.received_at = time.monotonic() if received_at is None else received_at
        self.queued = 0.0
        self.cancelled = False
        self.gone: asyncio.Future = asyncio.get_running_loop().create_future()
        self.attempt: Attempt | None = None
        self.owner = owner
        self.priority = priority
        self.observer = observer

    def cancel(self) -> None:
        """The client went away: close the upstream connection now."""
        self.cancelled = True
        if not self.gone.done():
            self.gone.set_result(None)
        if self.attempt is not None:
            self.attempt.handle.close("client disconnected")

    async def run(self, key: str) -> None:
        """Relay the request to the best node for the model `key`.

        The first node is asked for outside any try: NoSuchModel,
        NoHealthyNode, QueueFull and QueueTimeout reach the caller, which
        answers them. Later failures end with the last node's answer or a
        503 written here."""
        tried: set[int] = set()
        refused: Attempt | None = None
        why = "no node available"
        try:
            while not self.cancelled:
                try:
                    async with self.relay.scheduler.slot(key, tried, self.gone, self.hint,
                                                         owner=self.owner,
                                                         priority=self.priority) as slot:
                        if slot is None:
                            break
                        attempt = await self._attempt(slot, key, tried)
                        if self.cancelled:
                            return
                        if attempt.forwarding:
                            await self._finish_stream(attempt)
                            return
                        why = self._failed_over(attempt)
                        if attempt.status is not None:
                            refused = attempt
                except Unroutable:
                    if not tried:
                        raise
                    break
            if self.cancelled:
                return
            if refused is not None:
                # Every node refused: pass the last node's own answer through.
                self.forward_head(refused)
                self.sink.body(bytes(refused.error_buffer))
                return
            self.sink.error(503, f"no node could serve the request ({why})")
        finally:
            # The request is over: let go of its body and its last attempt
            # now, not at the next full garbage collection.
            self.body = None
            self.attempt = None

    async def _attempt(self, slot: Slot, key: str, tried: set[int]) -> Attempt:
        node = slot.node
        tried.add(node.id)
        self.queued += slot.waited
        if slot.waited > 0.0005:
            self.relay.metrics.queue_wait.observe((), slot.waited)
        attempt = Attempt(self, node, self._more_candidates(key, tried))
        attempt.route = slot.route
        self.attempt = attempt
        attempt.ended(await self.relay.fetch(self, attempt))
        slot.ok = not attempt.failed or self.cancelled
        if attempt.forwarding and self.observer is not None:
            self.observer.end(attempt.status or 599, time.monotonic() - attempt.started,
                              attempt.failed)
        return attempt

    def _more_candidates(self, key: str, tried: set[int]) -> bool:
        try:
            return any(n.id not in tried for n in self.relay.router.eligible(key))
        except Unroutable:
            return False

    def _failed_over(self, attempt: Attempt) -> str:
        """Nothing reached the client: note why, for the log and the node."""
        node = attempt.node
        if attempt.status is not None:
            why = f"node {node.name} answered {attempt.status}"
            if attempt.status == 404:
                self.relay.model_missing(node)
        else:
            why = f"node {node.name} failed: {describe_failure(attempt, attempt.handle)}"
            if not own_fault(attempt):
                self.relay.node_failed(node, why)
        self.relay.metrics.failure(node.name, self.model,
                                   "status" if attempt.status else "connect")
        log.info("failing over from %s: %s", node.name, why)
        return why

    def forward_head(self, attempt: Attempt) -> None:
        overhead = (attempt.started - self.received_at - self.queued
                    + time.monotonic() - attempt.last_activity)
        self.sink.head(attempt.status or 502, attempt.reason, attempt.headers,
                       attempt.node.header_name, overhead)
        self.sink.route(attempt.route)
        self.relay.metrics.overhead.observe((), max(overhead, 0.0))

    async def _finish_stream(self, attempt: Attempt) -> None:
        if not attempt.failed:
            return
        node = attempt.node
        message = (f"upstream node {node.name} failed mid-response: "
                   f"{describe_failure(attempt, attempt.handle)}")
        log.warning(message)
        self.relay.metrics.failure(node.name, self.model, "midstream")
        if not own_fault(attempt):
            self.relay.transport_failed(node, message)
        await self.sink.broken(message)


def describe_failure(outcome: HTTPResponse | Outcome | Attempt,
                     handle: ConnectionHandle) -> str:
    if handle.closed_reason is not None:
        return handle.closed_reason
    if outcome.error is None:
        return f"status {outcome.code or 599}"
    return str(outcome.error) or outcome.error.__class__.__name__


def own_fault(outcome: HTTPResponse | Outcome | Attempt) -> bool:
    """The proxy itself ran out of file descriptors: not the node's fault."""
    return out_of_descriptors(outcome.error)


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class Relay:
    """Shared relay machinery: the upstream client, timeouts, bookkeeping."""

    def __init__(self, registry: Registry, router: Router, scheduler: Scheduler,
                 metrics: Metrics, *, connect_timeout: float, idle_timeout: float,
                 max_body_size: int, node_ssl: ssl.SSLContext | None = None,
                 allowed: Networks = ()) -> None:
        self.registry = registry
        self.router = router
        self.scheduler = scheduler
        self.metrics = metrics
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        # Tornado's client for everything but relayed requests (model operations,
        # blobs); relayed requests take the lean path on the same connection pool.
        self.client = make_upstream_client(max_body_size, node_ssl, allowed)
        self.lean = LeanClient(self.client.pool, self.client.tcp_client,
                               max_body_size=max_body_size, node_ssl=node_ssl)
        # Set by the app: re-probe a node whose model list proved stale.
        self.on_missing_model: Callable[[NodeState], None] | None = None
        self.attempts: dict[int, set[Attempt]] = {}  # in flight, by node id
        self.in_flight = 0        # upstream exchanges under way
        self.peak_in_flight = 0   # their most since the memory trimmer last looked

    def node_failed(self, node: NodeState, reason: str) -> None:
        """A request could not reach the node: take it out of the pool now,
        without waiting for the next probe."""
        self.registry.mark_down(node, reason)
        self.transport_failed(node, reason)

    def transport_failed(self, node: NodeState, reason: str) -> None:
        if self.registry.transport_failed(node, reason):
            log.warning("circuit opened for node %s: %s", node.name, node.reason)

    def node_down(self, node: NodeState) -> None:
        """The monitor found the node down (it stopped answering probes):
        requests on it that have sent nothing to their client yet fail over
        to another node, streams already started end with an error line,
        rather than waiting out the idle timeout on a hung machine."""
        for attempt in list(self.attempts.get(node.id, ())):
            attempt.handle.close(f"node {node.name} stopped answering: {node.reason}")

    def node_busy(self, node: NodeState, retry_after: str | None) -> None:
        self.registry.busy(node, _retry_after(retry_after))

    def model_missing(self, node: NodeState) -> None:
        if self.on_missing_model is not None:
            self.on_missing_model(node)

    async def _send(self, exchange: Exchange, attempt: Attempt) -> Outcome:
        # No total deadline: the idle watchdog instead. No decompression, no
        # redirects: the client gets the node's answer as it is.
        return await self.lean.fetch(attempt.node.url, exchange.path, exchange.method,
                                     exchange.up_headers, exchange.body, attempt.handle,
                                     attempt.on_head, attempt.on_chunk, self.connect_timeout)

    async def fetch(self, exchange: Exchange, attempt: Attempt) -> Outcome:
        """One upstream exchange on the node the scheduler reserved."""
        node = attempt.node
        watchdog = IdleWatchdog(attempt, self.idle_timeout)
        in_flight = self.attempts.setdefault(node.id, set())
        in_flight.add(attempt)
        self.in_flight += 1
        if self.in_flight > self.peak_in_flight:
            self.peak_in_flight = self.in_flight
        try:
            response = await self._send(exchange, attempt)
            if (response.code == 599 and attempt.handle.reused and attempt.status is None
                    and not exchange.cancelled and attempt.handle.closed_reason is None):
                # A kept-alive connection the node had already closed: that
                # says nothing about the node. Once more on a new connection.
                attempt.handle = ConnectionHandle(fresh_only=True)
                response = await self._send(exchange, attempt)
            return response
        finally:
            watchdog.stop()
            self.in_flight -= 1
            in_flight.discard(attempt)
            if not in_flight:
                self.attempts.pop(node.id, None)
            if attempt.forwarding:
                now = time.monotonic()
                ttft = None if attempt.first_chunk_at is None else (
                    attempt.first_chunk_at - attempt.started)
                self.metrics.request_done(node.name, exchange.model, attempt.status or 599,
                                          now - attempt.started, ttft)

    def reset_peak(self) -> None:
        self.peak_in_flight = self.in_flight

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
