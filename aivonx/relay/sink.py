"""What the relay writes to its client: a head, chunks, an error, an abort.

Everything that reaches the client of a relayed request goes through a
ClientSink: which node headers pass (hop-by-hop and origin-scoped ones do
not), how a stream that broke ends in its own framing, and the proxy's own
errors in the client's dialect.
"""
from __future__ import annotations

import tornado.web
from tornado import httputil

from ..errors import error_body, stream_error_chunk

# Headers that describe one hop, never forwarded (RFC 9110 section 7.6.1).
HOP_BY_HOP = frozenset(h.lower() for h in (
    "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization",
    "Proxy-Connection", "TE", "Trailer", "Transfer-Encoding", "Upgrade",
))
# A node's answer is served on Aivonx's own origin: a node must not set
# cookies there (the status page's session and flash live there), pin
# transport security, or clear the site's data. Date and Server are the
# proxy's own.
NOT_FORWARDED_DOWN = HOP_BY_HOP | {
    "date", "server", "set-cookie", "set-cookie2", "clear-site-data",
    "strict-transport-security", "alt-svc", "public-key-pins",
}


def connection_tokens(headers: httputil.HTTPHeaders) -> set[str]:
    """Header names the sender listed in `Connection`: hop-by-hop as well."""
    return {token.strip().lower() for value in headers.get_list("Connection")
            for token in value.split(",") if token.strip()}


class ClientSink:
    """The client side of one relayed request, on its RequestHandler."""

    def __init__(self, handler: tornado.web.RequestHandler, style: str) -> None:
        self.handler = handler
        self.style = style
        self.content_type = ""

    def head(self, status: int, reason: str, headers: httputil.HTTPHeaders,
             node_name: str, overhead: float) -> None:
        """The node's status and headers, plus which node answered and what
        the proxy itself cost (queueing and the node's own time excluded)."""
        handler = self.handler
        handler.set_status(status, reason or None)
        handler.clear_header("Content-Type")
        dropped = NOT_FORWARDED_DOWN | connection_tokens(headers)
        seen: set[str] = set()
        for name, value in headers.get_all():
            lower = name.lower()
            if lower in dropped:
                continue
            if lower in seen:
                handler.add_header(name, value)  # every value of a repeated header
            else:
                seen.add(lower)
                handler.set_header(name, value)
        handler.set_header("X-Aivonx-Node", node_name)
        handler.set_header("X-Aivonx-Overhead-Ms", f"{max(overhead, 0.0) * 1000:.3f}")
        self.content_type = headers.get("Content-Type", "")

    def route(self, why: str) -> None:
        """Why the router chose the node that answers (X-Aivonx-Route)."""
        if why:
            self.handler.set_header("X-Aivonx-Route", why)

    async def chunk(self, data: bytes) -> None:
        self.handler.write(data)
        await self.handler.flush()

    def body(self, data: bytes) -> None:
        """A whole body after `head` (the last node's refusal, passed on)."""
        self.handler.clear_header("Content-Length")
        if data:
            self.handler.write(data)

    async def broken(self, message: str) -> None:
        """The node failed mid-response: end the stream with an error in its
        own framing, or, for a fixed-length body that cannot be completed,
        cut the connection so the client sees a short read rather than a
        corrupt document."""
        chunk = stream_error_chunk(self.content_type, message, self.style)
        if chunk is None:
            self.abort()
            return
        try:
            await self.chunk(chunk)
        except Exception:  # the client may be gone as well
            pass

    def abort(self) -> None:
        connection = self.handler.request.connection
        if connection is not None:
            connection.close()

    def error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        """An error produced by the proxy itself, in the client's dialect."""
        handler = self.handler
        handler.set_status(status)
        for name, value in (headers or {}).items():
            handler.set_header(name, value)
        handler.set_header("Content-Type", "application/json; charset=utf-8")
        if status >= 500:
            # The openai SDK resends 5xx by itself; every node was tried already.
            handler.set_header("x-should-retry", "false")
        handler.write(error_body(self.style, message, status))
