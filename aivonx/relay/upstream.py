"""The HTTP client the relay talks to nodes with.

It is Tornado's simple AsyncHTTPClient (curl's reorders headers and body
for small responses, and raising from its callback does not stop a
transfer) with the changes the relay needs:

- each request's TCP stream is recorded in a per-request handle, so the
  relay can close the upstream connection at any moment, also while the
  node is silent loading a model (AsyncHTTPClient has no cancel);
- chunked bodies are delivered chunk by chunk and framed strictly (RFC 9112
  section 7.1): a bad frame ends the request with a clear error and closes
  its connection (see _ChunkRelayingConnection);
- connections, plain and TLS, are kept alive and reused per (scheme, host,
  port): opening a TCP connection per request was the largest single cost
  of relaying a small request. A connection holding bytes no request asked
  for is never reused (they would be read as the next answer), and idle
  ones are closed on a timer.
"""
from __future__ import annotations

import re
import select
import ssl
import time
from asyncio import Future
from collections import defaultdict
from typing import Any, Callable
from urllib.parse import urlsplit

from tornado import httputil
from tornado.http1connection import HTTP1Connection, HTTP1ConnectionParameters
from tornado.httpclient import HTTPRequest
from tornado.ioloop import PeriodicCallback
from tornado.iostream import IOStream, StreamClosedError, UnsatisfiableReadError
from tornado.simple_httpclient import SimpleAsyncHTTPClient, _HTTPConnection
from tornado.tcpclient import TCPClient

from .resolver import CachingResolver, Networks

# Idle connections kept per node, and how long one may stay idle. Ollama
# (Go's http.Server without an IdleTimeout) keeps them open indefinitely;
# the limit here only stops a burst from leaving sockets behind for ever.
MAX_IDLE_PER_NODE = 256
MAX_IDLE_SECONDS = 30.0
# How often idle connections past MAX_IDLE_SECONDS are closed, so a burst
# does not leave sockets open until traffic to the node returns.
PURGE_INTERVAL = 5.0
# Request bodies up to this size are sent in one piece with the head.
SEND_WITH_HEAD = 64 * 1024
# Chunk framing bounds: hex digits of a chunk size (16 is 2**64), bytes of
# a chunk-size or trailer line, trailer lines after the last chunk.
MAX_CHUNK_DIGITS = 16
MAX_CHUNK_LINE = 4096
MAX_TRAILER_LINES = 100
# chunk-size [ chunk-ext ]: hex digits only; whitespace only before the
# ';' of an extension; extensions may hold no control character but HTAB.
_CHUNK_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,%d})(?:[ \t]*;[^\x00-\x08\x0a-\x1f\x7f]*)?"
                              % MAX_CHUNK_DIGITS)
_FIELD_LINE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+:[^\x00-\x08\x0a-\x1f\x7f]*")

PoolKey = tuple[str, str, int]  # (scheme, host, port)


def parse_chunk_size(line: bytes) -> int:
    """The size a chunk-size line announces (its CRLF stripped), read as
    RFC 9112 section 7.1 writes it. int(x, 16) would also take "0x1a",
    "1_a", "+1a" and spaces: a node and a stricter hop could then disagree
    on where the body ends."""
    match = _CHUNK_SIZE_LINE.fullmatch(line)
    if match is None:
        raise httputil.HTTPInputError(f"invalid chunk size line {line[:40]!r}")
    return int(match.group(1), 16)


def check_trailer_line(line: bytes) -> None:
    """A trailer field line after the last chunk (CRLF stripped): a field
    name, a colon and a value; it is read and dropped."""
    if _FIELD_LINE.fullmatch(line) is None:
        raise httputil.HTTPInputError(f"invalid trailer line {line[:40]!r}")


def pool_key(url: str) -> PoolKey:
    """Where a request to `url` connects, as Tornado's client works it out:
    the scheme is part of it, so an http and an https node on one host and
    port never share a socket."""
    parts = urlsplit(url)
    host, port = httputil.split_host_and_port(parts.netloc.rpartition("@")[-1])
    scheme = parts.scheme.lower()
    if port is None:
        port = 443 if scheme == "https" else 80
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return scheme, host.lower(), port


def node_ssl_context(ca_file: str | None) -> ssl.SSLContext | None:
    """How HTTPS nodes are verified: against the PEM bundle `ca_file`
    instead of the system's trust store when one is given (host names are
    checked either way). Built once: Tornado would otherwise load the file
    again for every request."""
    if not ca_file:
        return None
    return ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)


def has_unread(stream: IOStream) -> bool:
    """True when a connection no request is reading holds bytes or an end of
    file: whatever the node sent there is not the answer to the next request.
    Costs a zero-timeout poll, no read."""
    # IOStream reads ahead into a private buffer and has no public way to
    # tell its size; _read_buffer_size is that size in Tornado 6 (pinned).
    if getattr(stream, "_read_buffer_size", 0):
        return True
    sock = stream.socket
    if sock is None:
        return True
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True  # decrypted by the TLS layer, not yet read by IOStream
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        return bool(poller.poll(0))
    return bool(select.select([sock], [], [], 0)[0])  # Windows: no poll()


class UpstreamRequest(HTTPRequest):
    """An HTTPRequest carrying the handle of the connection that serves it,
    and a callback for the parsed response head (header_callback would make
    Tornado format every header line for the relay to parse again)."""

    def __init__(self, url: str, handle: "ConnectionHandle",
                 on_head: Callable[[int, str, httputil.HTTPHeaders], None] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self.connection_handle = handle
        self.on_head = on_head


class ConnectionHandle:
    """Lets the relay close one request's upstream socket at any moment."""

    def __init__(self, fresh_only: bool = False) -> None:
        self.stream: IOStream | None = None
        self.closed_reason: str | None = None
        self.fresh_only = fresh_only  # never take a kept-alive connection
        self.reused = False           # the request went out on one

    def attach(self, stream: IOStream) -> None:
        self.stream = stream
        if self.closed_reason is not None:
            stream.close()

    def close(self, reason: str) -> None:
        if self.closed_reason is None:
            self.closed_reason = reason
        if self.stream is not None:
            self.stream.close()


class ConnectionPool:
    """Idle keep-alive connections per (scheme, host, port), newest first.

    Every request of one client verifies TLS nodes the same way, so a TLS
    connection may serve any later request to its key. Connections idle
    longer than `max_idle` are closed by a timer that runs while any are
    kept, also when no request comes to take or return one."""

    def __init__(self, max_idle: float = MAX_IDLE_SECONDS,
                 purge_interval: float = PURGE_INTERVAL) -> None:
        self.max_idle = max_idle
        self.purge_interval = purge_interval
        self.idle: dict[PoolKey, list[tuple[float, IOStream]]] = defaultdict(list)
        self._purger: PeriodicCallback | None = None

    def take(self, key: PoolKey) -> IOStream | None:
        streams = self.idle.get(key)
        now = time.monotonic()
        while streams:
            since, stream = streams.pop()
            if stream.closed() or now - since > self.max_idle or has_unread(stream):
                stream.close()
                continue
            return stream
        return None

    def put(self, key: PoolKey, stream: IOStream) -> None:
        streams = self.idle[key]
        now = time.monotonic()
        while streams and (now - streams[0][0] > self.max_idle or
                           len(streams) >= MAX_IDLE_PER_NODE):
            streams.pop(0)[1].close()
        # No close callback: registering one costs an epoll change per
        # request. A node that hangs up while a connection is idle is noticed
        # when the connection is taken (closed, or readable: has_unread) or
        # by the purge timer within purge_interval.
        streams.append((now, stream))
        if self._purger is None:
            self._purger = PeriodicCallback(self.purge, self.purge_interval * 1000)
            self._purger.start()

    def purge(self) -> None:
        """Close the connections idle for longer than max_idle or hung up by
        their node; the timer
        stops once none are left and starts again with the next one kept."""
        now = time.monotonic()
        for key, streams in list(self.idle.items()):
            while streams and now - streams[0][0] > self.max_idle:
                streams.pop(0)[1].close()
            for entry in [e for e in streams if e[1].closed() or has_unread(e[1])]:
                streams.remove(entry)  # the node hung up (or sent what no one asked for)
                entry[1].close()
            if not streams:
                del self.idle[key]
        if not self.idle:
            self._stop_purging()

    def close_idle(self, key: PoolKey) -> None:
        """Close the idle connections to one node (deleted, drained, moved)."""
        for _, stream in list(self.idle.pop(key, [])):
            stream.close()

    def _stop_purging(self) -> None:
        if self._purger is not None:
            self._purger.stop()
            self._purger = None

    def close(self) -> None:
        self._stop_purging()
        for streams in self.idle.values():
            for _, stream in list(streams):
                stream.close()
        self.idle.clear()


class _PoolConnector:
    """Stands in for the TCPClient of one request: a kept-alive connection
    to the node when there is one, a new one otherwise."""

    def __init__(self, pool: ConnectionPool, tcp_client: TCPClient,
                 handle: ConnectionHandle, url: str) -> None:
        self.pool = pool
        self.tcp_client = tcp_client
        self.handle = handle
        self.url = url
        self.key: PoolKey | None = None

    async def connect(self, host: str, port: int, **kwargs: Any) -> IOStream:
        self.key = pool_key(self.url)
        if not self.handle.fresh_only:
            stream = self.pool.take(self.key)
            if stream is not None:
                self.handle.reused = True
                return stream
        return await self.tcp_client.connect(host, port, **kwargs)


class _ChunkRelayingConnection(HTTP1Connection):
    """Sends a small request in one piece and hands each chunk of a chunked
    response over as it is read.

    Tornado writes a request's head and body with two sends; every send
    costs a trip through the kernel (on loopback it also runs the
    receiver's TCP processing), so a small body goes out with the head.

    Tornado 6.6 merges response chunks that arrive in one read, and when
    the node closes the connection right after them, the merged data is
    dropped before it is delivered: the last tokens of a stream that broke
    would be lost. Here every chunk is delivered before the next read, so
    what the node sent before it died reaches the client.
    """

    def __init__(self, *args: Any, body: bytes | None = None) -> None:
        super().__init__(*args)
        self._body_with_head = body if body and len(body) <= SEND_WITH_HEAD else None
        self.input_error: httputil.HTTPInputError | None = None

    def write_headers(self, start_line: Any, headers: httputil.HTTPHeaders,
                      chunk: bytes | None = None) -> Future:
        if chunk is None and self._body_with_head is not None:
            chunk = self._body_with_head
        else:
            self._body_with_head = None
        return super().write_headers(start_line, headers, chunk)

    def write(self, chunk: bytes) -> Future:
        if chunk is self._body_with_head:  # already sent with the head
            self._body_with_head = None
            done: Future = Future()
            done.set_result(None)
            return done
        return super().write(chunk)

    async def _read_chunked_body(self, delegate: httputil.HTTPMessageDelegate) -> None:
        try:
            await self._read_chunks(delegate)
        except httputil.HTTPInputError as exc:
            # Tornado closes the connection and tells the request only that
            # it closed; _TrackedConnection reports this instead.
            self.input_error = exc
            raise

    async def _read_chunks(self, delegate: httputil.HTTPMessageDelegate) -> None:
        total = 0
        while True:
            size = parse_chunk_size(await self._read_line("chunk size"))
            if size == 0:
                await self._read_trailers()
                return
            total += size
            if total > self._max_body_size:
                raise httputil.HTTPInputError("chunked body too large")
            if size + 2 <= self.params.chunk_size:
                # The usual case, one NDJSON line or SSE event: the data and
                # its CRLF in one read.
                data = await self.stream.read_bytes(size + 2)
                if data[-2:] != b"\r\n":
                    raise httputil.HTTPInputError("improperly terminated chunk")
                result = delegate.data_received(data[:-2])
                if result is not None:
                    await result
                continue
            remaining = size
            while remaining:
                data = await self.stream.read_bytes(min(remaining, self.params.chunk_size),
                                                    partial=True)
                remaining -= len(data)
                result = delegate.data_received(data)
                if result is not None:
                    await result
            if await self.stream.read_bytes(2) != b"\r\n":
                raise httputil.HTTPInputError("improperly terminated chunk")

    async def _read_line(self, what: str) -> bytes:
        """One CRLF-terminated line of chunk framing, CRLF stripped."""
        try:
            line = await self.stream.read_until(b"\r\n", max_bytes=MAX_CHUNK_LINE)
        except StreamClosedError as exc:
            if isinstance(exc.real_error, UnsatisfiableReadError):
                raise httputil.HTTPInputError(f"{what} line longer than "
                                              f"{MAX_CHUNK_LINE} bytes") from None
            raise
        return line[:-2]

    async def _read_trailers(self) -> None:
        """The trailer section after the last chunk, up to its empty line;
        the fields are dropped (the relay has already sent the head)."""
        for _ in range(MAX_TRAILER_LINES + 1):
            line = await self._read_line("trailer")
            if not line:
                return
            check_trailer_line(line)
        raise httputil.HTTPInputError(f"more than {MAX_TRAILER_LINES} trailer lines")


class _TrackedConnection(_HTTPConnection):
    def __init__(self, client: "UpstreamClient", request: Any, release_callback: Any,
                 final_callback: Any, max_buffer_size: int, tcp_client: TCPClient,
                 max_header_size: int, max_body_size: int) -> None:
        self.handle: ConnectionHandle | None = getattr(request, "connection_handle", None)
        if self.handle is not None:
            tcp_client = _PoolConnector(client.pool, tcp_client, self.handle, request.url)
        self.keep_alive = False
        super().__init__(client, request, release_callback, final_callback, max_buffer_size,
                         tcp_client, max_header_size, max_body_size)

    def _create_connection(self, stream: IOStream) -> HTTP1Connection:
        if self.handle is not None:
            self.handle.attach(stream)
        stream.set_nodelay(True)
        return _ChunkRelayingConnection(
            stream, True,
            HTTP1ConnectionParameters(no_keep_alive=self.handle is None,
                                      max_header_size=self.max_header_size,
                                      max_body_size=self.max_body_size,
                                      decompress=bool(self.request.decompress_response)),
            self._sockaddr, body=self.request.body)

    def on_connection_close(self) -> None:
        # A framing error closes the connection; the request fails with
        # what was wrong rather than a bare "Connection closed".
        error = getattr(getattr(self, "connection", None), "input_error", None)
        if error is not None and self.final_callback is not None:
            self._handle_exception(type(error), error, None)
            return
        super().on_connection_close()

    async def headers_received(self, first_line: Any, headers: httputil.HTTPHeaders) -> None:
        self.keep_alive = (first_line.version == "HTTP/1.1" and
                           headers.get("Connection", "").lower() != "close")
        await super().headers_received(first_line, headers)
        on_head = getattr(self.request, "on_head", None)
        if on_head is not None and first_line.code >= 200:
            on_head(first_line.code, first_line.reason, headers)

    def _on_end_request(self) -> None:
        """The whole response was read: keep the connection for the next
        request to this node, unless either side wants it closed or the node
        sent more than the response (beyond its Content-Length or last chunk)."""
        connector = self.tcp_client
        if (self.keep_alive and isinstance(connector, _PoolConnector) and
                connector.key is not None and not self.stream.closed() and
                self.handle is not None and self.handle.closed_reason is None and
                not has_unread(self.stream)):
            stream = self.connection.detach()
            self.handle.stream = None  # a later cancel must not close it
            connector.pool.put(connector.key, stream)
            return
        self.stream.close()


class UpstreamClient(SimpleAsyncHTTPClient):
    def initialize(self, **kwargs: Any) -> None:  # type: ignore[override]
        super().initialize(**kwargs)
        self.pool = ConnectionPool()

    def _connection_class(self) -> type:
        return _TrackedConnection

    def close_idle(self, url: str) -> None:
        """Close the idle connections to the node at `url` (e.g. its base
        URL); requests in flight keep theirs."""
        self.pool.close_idle(pool_key(url))

    def close(self) -> None:
        self.pool.close()
        super().close()


def make_upstream_client(max_body_size: int, node_ssl: ssl.SSLContext | None = None,
                         allowed: Networks = ()) -> UpstreamClient:
    """`node_ssl` verifies HTTPS nodes (see node_ssl_context); None: the
    system's trust store."""
    # max_clients: the default of 10 would queue requests silently behind
    # long generations; every request gets its own connection instead.
    return UpstreamClient(force_instance=True, max_clients=100_000,
                          max_body_size=max_body_size,
                          max_buffer_size=max_body_size, resolver=CachingResolver(allowed),
                          defaults={"ssl_options": node_ssl} if node_ssl else None)
