"""A node that writes exact bytes: for framing faults no HTTP server would make.

It answers the proxy's probes (/, /api/tags, /api/ps, /api/version) as Ollama
does, and every POST /api/generate with what the test's `answer(n)` returns
for the n-th one (1-based): a list of byte strings to write and float pauses
(seconds) between them. It keeps connections alive and counts them.
"""
from __future__ import annotations

import asyncio
import json
from typing import Callable, Sequence

Piece = bytes | float

_PROBES = {
    "/": (b"text/plain; charset=utf-8", b"Ollama is running"),
    "/api/tags": (b"application/json", json.dumps({"models": [
        {"name": "llama3:latest", "model": "llama3:latest", "size": 1,
         "digest": "0" * 64, "details": {}}]}).encode()),
    "/api/ps": (b"application/json", b'{"models":[]}'),
    "/api/version": (b"application/json", b'{"version":"0.12.3"}'),
}


def response(body: bytes, content_type: bytes = b"application/json",
             length: int | None = None) -> bytes:
    """A whole HTTP/1.1 response; `length` may disagree with the body."""
    return (b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n"
            % (content_type, len(body) if length is None else length) + body)


def chunked_head(content_type: bytes = b"application/x-ndjson") -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nTransfer-Encoding: chunked\r\n\r\n"
            % content_type)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def generation(text: str, done: bool = True) -> bytes:
    """One line of a generate answer."""
    return json.dumps({"model": "llama3", "response": text, "done": done}).encode() + b"\n"


class RawNode:
    def __init__(self, answer: Callable[[int], Sequence[Piece]]) -> None:
        self.answer = answer
        self.generates = 0          # POST /api/generate requests received
        self.generate_connections: list[int] = []  # which connection carried each
        self.accepted = 0           # connections accepted
        self.open = 0               # connections open now
        self.written = 0            # byte pieces of generate answers written
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> RawNode:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.open += 1
        connection = self.accepted
        self._writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, *lines = head.decode("latin-1").split("\r\n")
                method, path, _ = request_line.split(" ", 2)
                length = 0
                for line in lines:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                await reader.readexactly(length)
                if method == "POST" and path == "/api/generate":
                    self.generates += 1
                    self.generate_connections.append(connection)
                    for piece in self.answer(self.generates):
                        if isinstance(piece, float):
                            await asyncio.sleep(piece)
                        else:
                            writer.write(piece)
                            await writer.drain()
                            self.written += 1
                else:
                    content_type, body = _PROBES.get(path, (b"text/plain", b"404 page not found"))
                    writer.write(response(body, content_type))
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            self.open -= 1
            self._writers.discard(writer)
            writer.close()
