"""The HTTP server, with a bound on client connections that holds when file
descriptors run out.

Tornado's accept loop re-raises EMFILE: the listening socket stays readable,
so the loop spins at full CPU writing a traceback per try, and every other
descriptor the process needs (node connections, probes, the database) fails
too. Here the server stops accepting while it holds its connection cap (the
kernel's backlog keeps the waiting clients), and when accept still finds no
descriptor it pauses briefly and says so once per interval, with a count.
"""
from __future__ import annotations

import errno
import logging
import resource
import socket
import time
from typing import Any, Iterable

from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop
from tornado.iostream import IOStream

log = logging.getLogger("aivonx.server")

# Descriptors kept for what is not a client connection: the database, the
# listening sockets, node probes and the log. Each client connection may
# need a second descriptor for its node.
RESERVED_FDS = 64
EMFILE_PAUSE = 0.2      # seconds without accepting after accept found no descriptor
EMFILE_LOG_EVERY = 10.0
ACCEPTS_PER_EVENT = 128


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (a proxy holds two
    descriptors per request); returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the file descriptor limit from %d: %s", soft, exc)
    return soft


def connection_cap(max_connections: int, fd_limit: int | None = None) -> int:
    """Client connections that fit in the descriptor limit, two each."""
    if fd_limit is None:
        fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if fd_limit == resource.RLIM_INFINITY:
        return max_connections
    reserved = min(RESERVED_FDS, fd_limit // 4)
    return max(1, min(max_connections, (fd_limit - reserved) // 2))


def _nodelay_kept(value: bool) -> None:
    """A connection's TCP_NODELAY, set once when it was accepted, stays."""


class BoundedHTTPServer(HTTPServer):
    def initialize(self, *args: Any, max_connections: int = 4096, **kwargs: Any) -> None:
        super().initialize(*args, **kwargs)
        self.max_connections = connection_cap(max_connections)
        self.paused = False
        self.accept_errors = 0          # EMFILE/ENFILE since the last log line
        self.accept_errors_total = 0
        self._last_error_log = 0.0
        self._resume_timer: Any = None

    def handle_stream(self, stream: IOStream, address: tuple) -> None:
        # Tornado turns Nagle's algorithm off at the end of each response and
        # on again for the next one: two setsockopt calls per request. Every
        # write here is a flush meant to leave at once (a relayed chunk above
        # all), so it stays off for the connection's life.
        stream.set_nodelay(True)
        stream.set_nodelay = _nodelay_kept  # type: ignore[method-assign]
        super().handle_stream(stream, address)

    # -- accepting ------------------------------------------------------------
    def add_sockets(self, sockets: Iterable[socket.socket]) -> None:
        loop = IOLoop.current()
        for sock in sockets:
            fd = sock.fileno()
            self._sockets[fd] = sock
            loop.add_handler(fd, self._on_acceptable, IOLoop.READ)
            self._handlers[fd] = self._remover(fd)

    def _remover(self, fd: int) -> Any:
        def remove() -> None:
            if not self.paused:
                IOLoop.current().remove_handler(fd)
        return remove

    def _on_acceptable(self, fd: int, events: int) -> None:
        sock = self._sockets.get(fd)
        if sock is None:
            return
        for _ in range(ACCEPTS_PER_EVENT):
            if len(self._connections) >= self.max_connections:
                self._pause()
                return
            try:
                connection, address = sock.accept()
            except BlockingIOError:
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    self._out_of_descriptors()
                    return
                raise
            self._handle_connection(connection, address)

    def _pause(self, resume_after: float | None = None) -> None:
        if not self.paused:
            self.paused = True
            loop = IOLoop.current()
            for fd in self._sockets:
                loop.remove_handler(fd)
        if resume_after is not None and self._resume_timer is None:
            self._resume_timer = IOLoop.current().call_later(resume_after, self._resume)

    def _resume(self) -> None:
        self._resume_timer = None
        if not self.paused or len(self._connections) >= self.max_connections:
            return
        self.paused = False
        loop = IOLoop.current()
        for fd in self._sockets:
            loop.add_handler(fd, self._on_acceptable, IOLoop.READ)

    def _out_of_descriptors(self) -> None:
        self.accept_errors += 1
        self.accept_errors_total += 1
        now = time.monotonic()
        if now - self._last_error_log >= EMFILE_LOG_EVERY:
            log.warning("out of file descriptors: %d connection(s) not accepted in the last "
                        "%g s (%d open; raise the limit with ulimit -n or lower "
                        "--max-connections)", self.accept_errors, EMFILE_LOG_EVERY,
                        len(self._connections))
            self.accept_errors = 0
            self._last_error_log = now
        self._pause(resume_after=EMFILE_PAUSE)

    def on_close(self, server_conn: object) -> None:
        super().on_close(server_conn)
        if self.paused and self._resume_timer is None:
            self._resume()

    def stop(self) -> None:
        if self._resume_timer is not None:
            IOLoop.current().remove_timeout(self._resume_timer)
            self._resume_timer = None
        super().stop()
