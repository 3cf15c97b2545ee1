"""What a client may send before a handler sees its request.

Tornado reads a whole request body before it creates the handler, so a size
check in a handler comes after the memory is spent: an unauthenticated
200 MB POST to the login would be read whole before its 413. Here each
request is vetted as its head arrives, by the handler class it routes to:

- a body larger than the handler accepts (its `max_body`) is refused from
  its Content-Length before a byte of it is read, and a chunked one as soon
  as it passes the limit;
- the request bodies held in memory at once are bounded (BodyBudget): past
  the bound a request is answered 503 with Retry-After rather than risking
  the process;
- a body must keep arriving: a client that pauses longer than the body
  timeout between two reads loses its connection (the head has a timeout
  of its own, and a node's silence is the relay's business, not this one).
"""
from __future__ import annotations

import logging
import re
from typing import Any, Awaitable

import tornado.web
from tornado import httputil
from tornado.ioloop import IOLoop
from tornado.routing import PathMatches, Rule

from .errors import error_body

log = logging.getLogger("aivonx.intake")

RETRY_AFTER = "2"


class BodyBudget:
    """Request-body bytes held in memory at once, across all requests."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.refused = 0

    def take(self, size: int) -> bool:
        if size > 0 and self.used + size > self.limit:
            self.refused += 1
            return False
        self.used += size
        return True

    def give(self, size: int) -> None:
        self.used -= size


class Reservation:
    """One request's share of the budget; given back once, whoever is first
    (the handler finishing, or the connection closing)."""

    def __init__(self, budget: BodyBudget) -> None:
        self.budget = budget
        self.size = 0

    def grow(self, size: int) -> bool:
        if not self.budget.take(size):
            return False
        self.size += size
        return True

    def release(self) -> None:
        if self.size:
            self.budget.give(self.size)
            self.size = 0


def release_body(request: httputil.HTTPServerRequest) -> None:
    """The request's body is no longer needed: free it and its budget."""
    request.body = b""
    reservation = getattr(request, "body_reservation", None)
    if reservation is not None:
        reservation.release()


class GuardedDelegate(httputil.HTTPMessageDelegate):
    """Stands between the connection and a handler's delegate."""

    def __init__(self, inner: httputil.HTTPMessageDelegate, request: httputil.HTTPServerRequest,
                 *, max_body: int, budget: BodyBudget | None, body_timeout: float,
                 style: str) -> None:
        self.inner = inner
        self.request = request
        self.max_body = max_body
        self.budget = budget
        self.body_timeout = body_timeout
        self.style = style
        self.received = 0
        self.chunked = False
        self.refused = False
        self.reservation: Reservation | None = None
        self.last_byte = 0.0
        self.timer: Any = None

    # -- the connection's side ---------------------------------------------
    def headers_received(self, start_line: httputil.RequestStartLine | httputil.ResponseStartLine,
                         headers: httputil.HTTPHeaders) -> Awaitable[None] | None:
        length = headers.get("Content-Length")
        self.chunked = "chunked" in headers.get("Transfer-Encoding", "").lower()
        declared = int(length) if length is not None and length.isdigit() else 0
        if declared > self.max_body:
            return self._refuse(413, f"request body too large ({declared} bytes; "
                                     f"the limit here is {self.max_body})")
        if self.budget is not None:
            self.reservation = Reservation(self.budget)
            self.request.body_reservation = self.reservation  # type: ignore[attr-defined]
            if not self.reservation.grow(declared):
                return self._refuse(503, "too many request bodies in memory at once; "
                                         "please try again", busy=True)
        if self.chunked or (declared and not self._body_buffered(declared)):
            self._arm()
        return self.inner.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        if self.refused:
            return None
        self.received += len(chunk)
        self.last_byte = IOLoop.current().time()
        if self.chunked:
            if self.received > self.max_body:
                self._refuse(413, f"request body too large (over {self.max_body} bytes)")
                return None
            if self.reservation is not None and not self.reservation.grow(len(chunk)):
                self._refuse(503, "too many request bodies in memory at once; "
                                  "please try again", busy=True)
                return None
        return self.inner.data_received(chunk)

    def finish(self) -> None:
        self._disarm()
        if not self.refused:
            self.inner.finish()
            # Tornado's handler delegate keeps the body's pieces after joining
            # them into request.body: a second copy for the request's lifetime.
            chunks = getattr(self.inner, "chunks", None)
            if isinstance(chunks, list):
                chunks.clear()

    def on_connection_close(self) -> None:
        """The client left while its request was still being read."""
        self._disarm()
        if self.reservation is not None:
            self.reservation.release()
        if not self.refused:
            self.inner.on_connection_close()

    # -- refusing and timing out -------------------------------------------
    def _refuse(self, status: int, message: str, busy: bool = False) -> None:
        """Answer now, without reading the body, and close the connection
        after the answer (Tornado does when a response ends before its
        request body was read)."""
        self.refused = True
        self._disarm()
        if self.reservation is not None:
            self.reservation.release()
        body = error_body(self.style, message, status)
        headers = httputil.HTTPHeaders({"Content-Type": "application/json; charset=utf-8",
                                        "Content-Length": str(len(body)),
                                        "Connection": "close"})
        if busy:
            headers["Retry-After"] = RETRY_AFTER
        connection = self.request.connection
        reason = httputil.responses.get(status, "Error")
        connection.write_headers(httputil.ResponseStartLine("HTTP/1.1", status, reason),
                                 headers, body)
        connection.finish()
        return None

    def _body_buffered(self, declared: int) -> bool:
        """The whole body came in the reads that brought the head (a small
        request): it is handed over without waiting, so no timer is needed."""
        # IOStream's read-ahead size has no public accessor (Tornado 6, pinned).
        stream = getattr(self.request.connection, "stream", None)
        return getattr(stream, "_read_buffer_size", 0) >= declared

    def _arm(self) -> None:
        loop = IOLoop.current()
        self.last_byte = loop.time()
        self.timer = loop.call_later(self.body_timeout, self._check)

    def _check(self) -> None:
        loop = IOLoop.current()
        idle = loop.time() - self.last_byte
        if idle < self.body_timeout:
            self.timer = loop.call_later(self.body_timeout - idle, self._check)
            return
        self.timer = None
        log.info("closing a connection from %s: no request body byte for %g s",
                 self.request.remote_ip, self.body_timeout)
        self.request.connection.close()

    def _disarm(self) -> None:
        if self.timer is not None:
            IOLoop.current().remove_timeout(self.timer)
            self.timer = None


def literal_routes(rules: list[Rule]) -> dict[str, tuple[type, dict[str, Any]]]:
    """Paths a rule names literally (no group, no pattern), with its handler
    and arguments: a dict lookup instead of trying every rule's regex in
    turn. A path some earlier rule also matches is left to the router, so
    the first matching rule still wins."""
    found: dict[str, tuple[type, dict[str, Any]]] = {}
    for index, rule in enumerate(rules):
        matcher = rule.matcher
        if not (isinstance(matcher, PathMatches) and matcher.regex.groups == 0
                and isinstance(rule.target, type)
                and issubclass(rule.target, tornado.web.RequestHandler)):
            continue
        path = matcher._path  # the reversed pattern; None when not reversible
        if (path is None or path in found or matcher.regex.fullmatch(path) is None
                or re.escape(path).replace("\\/", "/") + "$" != matcher.regex.pattern):
            continue
        if any(earlier.matcher.match(_PathOnly(path)) is not None
               for earlier in rules[:index]):
            continue
        found[path] = (rule.target, rule.target_kwargs)
    return found


class _PathOnly:
    """What a path matcher reads of a request."""

    def __init__(self, path: str) -> None:
        self.path = path


class GuardedApplication(tornado.web.Application):
    """A tornado Application whose requests pass through GuardedDelegate.

    A handler class says what it takes: `max_body` (None: the server-wide
    --max-body-size; a streaming handler may take more), `holds_body` (False for handlers that stream the body onwards
    instead of keeping it, which the budget does not count), and
    `error_style` for the dialect of the refusal."""

    def __init__(self, *args: Any, budget: BodyBudget, max_body: int, body_timeout: float,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.budget = budget
        self.max_body = max_body
        self.body_timeout = body_timeout
        self.literal_routes = literal_routes(self.wildcard_router.rules)

    def find_handler(self, request: httputil.HTTPServerRequest,
                     **kwargs: Any) -> httputil.HTTPMessageDelegate:
        literal = self.literal_routes.get(request.path)
        if literal is not None:
            inner: httputil.HTTPMessageDelegate = self.get_handler_delegate(
                request, literal[0], literal[1], [], {})
        else:
            inner = super().find_handler(request, **kwargs)
        handler_class = getattr(inner, "handler_class", tornado.web.RequestHandler)
        limit = getattr(handler_class, "max_body", None)
        return GuardedDelegate(
            inner, request,
            max_body=self.max_body if limit is None else limit,
            budget=self.budget if getattr(handler_class, "holds_body", True) else None,
            body_timeout=self.body_timeout,
            style=getattr(handler_class, "error_style", "ollama"))
