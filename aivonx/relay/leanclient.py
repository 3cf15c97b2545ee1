"""The relay's HTTP/1.1 client for model requests, on Tornado's IOStream.

Tornado's SimpleAsyncHTTPClient wraps each request in an HTTPRequest, a
request proxy, a queue entry, an _HTTPConnection with its timeouts and an
HTTP1Connection with its futures: under load that machinery cost more CPU
than the two socket sends a relayed request needs. The relay's exchanges
are all alike (one node, a body already in memory, the answer streamed on
as it comes), so this client does just that on the same kept-alive
connections (aivonx.relay.upstream's pool, resolver and TLS settings), with
strict HTTP/1.1 framing:

- the head must end in CRLF CRLF within MAX_HEADER_SIZE; a status line
  Tornado's parser refuses, or a 1xx other than informational, ends the
  exchange;
- Content-Length must be digits only (repeated values must agree) and may
  not come with Transfer-Encoding; the only transfer coding taken is
  `chunked`, parsed by aivonx.relay.upstream.parse_chunk_size;
- a framing error closes the connection (its remaining bytes can never be
  read as the next answer) and fails the request with what was wrong;
- a connection is kept for the next request only when the answer ended
  where its framing says, both sides allow keep-alive and nothing is left
  in its buffer.

Everything else (modelops, blobs, listings, probes) keeps Tornado's client.
"""
from __future__ import annotations

import re
import ssl
from typing import Awaitable, Callable
from urllib.parse import urlsplit

from tornado import httputil
from tornado.iostream import IOStream, StreamClosedError, UnsatisfiableReadError
from tornado.tcpclient import TCPClient

from .upstream import (MAX_CHUNK_LINE, MAX_TRAILER_LINES, ConnectionHandle, ConnectionPool,
                       PoolKey, check_trailer_line, parse_chunk_size, pool_key)

MAX_HEADER_SIZE = 64 * 1024
SEND_WITH_HEAD = 64 * 1024  # a body up to this size goes out in the head's send
READ_SIZE = 64 * 1024  # the most handed on per chunk callback of a sized body
_DIGITS = re.compile(rb"[0-9]{1,19}")
# field-name ":" OWS field-value OWS (RFC 9112 section 5): a token, then no
# control character but HTAB.
_FIELD_LINE = re.compile(r"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([^\x00-\x08\x0a-\x1f\x7f]*?)[ \t]*")
NO_BODY_STATUS = frozenset({204, 304})

OnHead = Callable[[int, str, httputil.HTTPHeaders], None]
OnChunk = Callable[[bytes], Awaitable[None]]


class Outcome:
    """How one exchange ended: the node's status, or 599 and the error when
    no complete answer came (the shape the relay reads off HTTPResponse)."""

    __slots__ = ("code", "error")

    def __init__(self, code: int, error: BaseException | None = None) -> None:
        self.code = code
        self.error = error


class FramingError(httputil.HTTPInputError):
    """The node's answer is not valid HTTP/1.1."""


class _Node:
    """What a node URL resolves to, worked out once per URL."""

    __slots__ = ("key", "host", "port", "tls", "host_header", "prefix")

    def __init__(self, url: str) -> None:
        self.key: PoolKey = pool_key(url)
        scheme, self.host, self.port = self.key
        self.tls = scheme == "https"
        parts = urlsplit(url)
        self.host_header = parts.netloc.rpartition("@")[2]
        self.prefix = parts.path.rstrip("/")  # a node served under a path


class LeanClient:
    def __init__(self, pool: ConnectionPool, tcp_client: TCPClient, *,
                 max_body_size: int, node_ssl: ssl.SSLContext | None = None) -> None:
        self.pool = pool
        self.tcp_client = tcp_client
        self.max_body_size = max_body_size
        self.node_ssl = node_ssl
        self._nodes: dict[str, _Node] = {}
        self._default_ssl: ssl.SSLContext | None = None

    def _node(self, base_url: str) -> _Node:
        node = self._nodes.get(base_url)
        if node is None:
            if len(self._nodes) > 4096:
                self._nodes.clear()
            node = self._nodes[base_url] = _Node(base_url)
        return node

    def _ssl(self) -> ssl.SSLContext:
        if self.node_ssl is not None:
            return self.node_ssl
        if self._default_ssl is None:
            self._default_ssl = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        return self._default_ssl

    async def _connect(self, node: _Node, handle: ConnectionHandle,
                       connect_timeout: float) -> IOStream:
        if not handle.fresh_only:
            stream = self.pool.take(node.key)
            if stream is not None:
                handle.reused = True
                return stream
        stream = await self.tcp_client.connect(
            node.host, node.port, ssl_options=self._ssl() if node.tls else None,
            timeout=connect_timeout or None)  # TLS checks the certificate against host
        stream.set_nodelay(True)
        return stream

    async def fetch(self, base_url: str, path: str, method: str,
                    fields: bytes, body: bytes | None,
                    handle: ConnectionHandle, on_head: OnHead, on_chunk: OnChunk,
                    connect_timeout: float) -> Outcome:
        """One request to the node at `base_url`, with the header lines
        `fields` (encoded, each ending in CRLF; Host and Content-Length are
        added here); never raises for what the node or the network did (the
        error is in the Outcome)."""
        node = self._node(base_url)
        try:
            stream = await self._connect(node, handle, connect_timeout)
        except Exception as exc:  # refused, unreachable, not allowed, timed out
            return Outcome(599, exc.with_traceback(None))
        handle.attach(stream)
        try:
            return await self._exchange(stream, node, path, method, fields, body, handle,
                                        on_head, on_chunk)
        except Exception as exc:
            stream.close()
            return Outcome(599, exc.with_traceback(None))

    async def _exchange(self, stream: IOStream, node: _Node, path: str, method: str,
                        fields: bytes, body: bytes | None,
                        handle: ConnectionHandle, on_head: OnHead, on_chunk: OnChunk
                        ) -> Outcome:
        length = (f"Content-Length: {len(body or b'')}\r\n"
                  if body or method in ("POST", "PUT", "PATCH") else "")
        raw = b"".join((f"{method} {node.prefix}{path} HTTP/1.1\r\nHost: {node.host_header}"
                        f"\r\n".encode("latin-1"), fields,
                        f"{length}\r\n".encode("latin-1")))
        if body and len(body) <= SEND_WITH_HEAD:
            stream.write(raw + body)
        else:
            stream.write(raw)
            if body:
                await stream.write(body)  # waits for the socket: backpressure

        code, reason, version, response_headers = await self._read_head(stream)
        keep_alive = (version == "HTTP/1.1"
                      and "close" not in response_headers.get("Connection", "").lower())
        # The framing is settled before the head goes anywhere: an answer whose
        # end cannot be told must not reach the client at all.
        framing, length = _framing(method, code, response_headers)
        if framing == "sized" and length > self.max_body_size:
            raise FramingError(f"response body of {length} bytes is too large")
        on_head(code, reason, response_headers)
        if framing == "chunked":
            await self._read_chunked(stream, on_chunk)
        elif framing == "sized":
            await self._read_sized(stream, length, on_chunk)
        elif framing == "close":
            await self._read_until_close(stream, on_chunk)
            keep_alive = False

        if (keep_alive and handle.closed_reason is None
                and not stream.closed() and not stream._read_buffer_size):
            # IOStream's read-ahead size has no public accessor (Tornado 6, pinned);
            # the pool checks the socket itself again when it hands the stream out.
            handle.stream = None  # a later cancel must not close it
            self.pool.put(node.key, stream)
        else:
            stream.close()
        return Outcome(code)

    async def _read_head(self, stream: IOStream
                         ) -> tuple[int, str, str, httputil.HTTPHeaders]:
        while True:
            try:
                data = await stream.read_until(b"\r\n\r\n", max_bytes=MAX_HEADER_SIZE)
            except StreamClosedError as exc:
                if isinstance(exc.real_error, UnsatisfiableReadError):
                    raise FramingError(f"response head longer than {MAX_HEADER_SIZE} "
                                       "bytes") from None
                raise
            first, *lines = data[:-4].decode("latin-1").split("\r\n")
            try:
                start = httputil.parse_response_start_line(first)
            except httputil.HTTPInputError as exc:
                raise FramingError(str(exc)) from None
            headers = httputil.HTTPHeaders()
            for line in lines:
                match = _FIELD_LINE.fullmatch(line)
                if match is None:  # also obs-fold and bare CR or LF: refused
                    raise FramingError(f"invalid header line {line[:40]!r}")
                headers.add(match.group(1), match.group(2))
            if start.code >= 200:
                return start.code, start.reason, start.version, headers
            if start.code == 101:
                raise FramingError("unexpected 101 Switching Protocols")
            # 100 Continue, 103 Early Hints: informational, the answer follows.

    async def _read_sized(self, stream: IOStream, remaining: int, on_chunk: OnChunk) -> None:
        while remaining:
            data = await stream.read_bytes(min(remaining, READ_SIZE), partial=True)
            remaining -= len(data)
            await on_chunk(data)

    async def _read_until_close(self, stream: IOStream, on_chunk: OnChunk) -> None:
        total = 0
        while True:
            try:
                data = await stream.read_bytes(READ_SIZE, partial=True)
            except StreamClosedError as exc:
                if exc.real_error is None:
                    return  # the node closed the connection: the end of the body
                raise
            total += len(data)
            if total > self.max_body_size:
                raise FramingError("response body too large")
            await on_chunk(data)

    async def _read_chunked(self, stream: IOStream, on_chunk: OnChunk) -> None:
        total = 0
        while True:
            size = parse_chunk_size(await _read_line(stream, "chunk size"))
            if size == 0:
                break
            total += size
            if total > self.max_body_size:
                raise FramingError("chunked body too large")
            if size + 2 <= READ_SIZE:
                # The usual case, one NDJSON line or SSE event: data and CRLF at once.
                data = await stream.read_bytes(size + 2)
                if data[-2:] != b"\r\n":
                    raise FramingError("improperly terminated chunk")
                await on_chunk(data[:-2])
                continue
            remaining = size
            while remaining:
                data = await stream.read_bytes(min(remaining, READ_SIZE), partial=True)
                remaining -= len(data)
                await on_chunk(data)
            if await stream.read_bytes(2) != b"\r\n":
                raise FramingError("improperly terminated chunk")
        for _ in range(MAX_TRAILER_LINES + 1):
            line = await _read_line(stream, "trailer")
            if not line:
                return
            check_trailer_line(line)
        raise FramingError(f"more than {MAX_TRAILER_LINES} trailer lines")


def _framing(method: str, code: int, headers: httputil.HTTPHeaders) -> tuple[str, int]:
    """How the body of an answer ends (RFC 9112 section 6.3): "none", "chunked",
    "sized" (with its length) or "close"."""
    if method == "HEAD" or code in NO_BODY_STATUS:
        return "none", 0
    encoding = headers.get("Transfer-Encoding")
    length = headers.get("Content-Length")
    if encoding is not None:
        if length is not None:
            raise FramingError("response with both Transfer-Encoding and Content-Length")
        if encoding.strip().lower() != "chunked":
            raise FramingError(f"unsupported Transfer-Encoding {encoding[:40]!r}")
        return "chunked", 0
    if length is not None:
        return "sized", _content_length(length)
    return "close", 0


def _content_length(value: str) -> int:
    """Content-Length as RFC 9110 section 8.6 has it: digits; a list of
    identical values counts as one, differing ones are an error."""
    values = {v.strip() for v in value.split(",")}
    if len(values) != 1:
        raise FramingError(f"conflicting Content-Length {value[:40]!r}")
    (only,) = values
    if _DIGITS.fullmatch(only.encode("latin-1")) is None:
        raise FramingError(f"invalid Content-Length {value[:40]!r}")
    return int(only)


async def _read_line(stream: IOStream, what: str) -> bytes:
    """One CRLF-terminated line of chunk framing, CRLF stripped."""
    try:
        line = await stream.read_until(b"\r\n", max_bytes=MAX_CHUNK_LINE)
    except StreamClosedError as exc:
        if isinstance(exc.real_error, UnsatisfiableReadError):
            raise FramingError(f"{what} line longer than {MAX_CHUNK_LINE} bytes") from None
        raise
    return line[:-2]
