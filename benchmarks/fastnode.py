#!/usr/bin/env python3
"""A fast fake Ollama node for the benchmark: a bare asyncio Protocol HTTP/1.1 server.

tests/fakes/fake_ollama.py (Tornado) speaks all of Ollama's API and misbehaves on request,
which the tests need, but it answers only a couple of thousand requests a second: behind a
benchmark it caps the direct figure, and nginx with it, and flatters every ratio. This
node speaks only what the benchmark sends, in Ollama's wire format, and costs a few tens of
microseconds a request:

- `POST /api/generate` and `/api/chat`: `stream: false` as one JSON object; streamed as
  NDJSON, one line per HTTP chunk, `--chunks` token lines `--chunk-delay` seconds apart and
  the final `done` line with Ollama's fields (durations in ns, `prompt_eval_count`,
  `eval_count`; `context` on generate). An empty prompt or message list loads the model.
- `POST /api/embed` (L2-normalised vectors), `GET /api/tags`, `/api/ps`, `/api/version`,
  `GET /` ("Ollama is running"); HEAD on the GETs; 404 `{"error": ...}` elsewhere.
- `GET /_fake/requests` with `--records N`: the last N requests, with when the node saw
  its client leave (wall clock), as tests/fakes/fake_ollama.py serves it.

Requests: keep-alive, Content-Length or chunked bodies, pipelined requests answered in
order (one at a time: a request waits while the one before it streams). A long
`--chunk-delay` gives held streams: the first chunk at once, then silence.

    python benchmarks/fastnode.py --port 0 --models llama3:latest --chunks 20

It prints `listening on http://127.0.0.1:PORT` once it listens. uvloop is used when
installed (it is in requirements.txt). `--reuse-port` binds with SO_REUSEPORT, so that
several processes can serve one port.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import hashlib
import json
import math
import signal
import socket
import time
from datetime import datetime, timedelta
from email.utils import formatdate
from typing import Any, Callable

HOST = "127.0.0.1"
MAX_HEAD = 64 * 1024  # a request head larger than this is refused (431)
MAX_BODY = 256 * 1024 * 1024  # Ollama has no limit; this one keeps a runaway client bounded
READ_PAUSE = 1024 * 1024  # stop reading while this much waits behind a streaming answer
KEEP_ALIVE = timedelta(minutes=5)  # Ollama's default: what /api/ps says a model expires in
MODIFIED_AT = "2025-05-04T17:37:44.706015-07:00"
CONTEXT_LENGTH = 4096
JSON_TYPE = b"application/json; charset=utf-8"
NDJSON_TYPE = b"application/x-ndjson"
TEXT_TYPE = b"text/plain; charset=utf-8"
REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed",
           413: b"Payload Too Large", 431: b"Request Header Fields Too Large",
           500: b"Internal Server Error", 501: b"Not Implemented"}


def _dumps(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


class Clock:
    """The Date header and `created_at`, rebuilt at most once a second / millisecond: both
    cost more than the rest of a small answer when formatted for every request."""

    def __init__(self) -> None:
        self._second = self._milli = -1
        self._date = b""
        self._stamp = ""

    def date(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second, self._date = now, formatdate(now, usegmt=True).encode()
        return self._date

    def stamp(self) -> str:
        now = time.time()
        milli = int(now * 1000)
        if milli != self._milli:
            self._milli = milli
            self._stamp = datetime.fromtimestamp(now).astimezone().isoformat()
        return self._stamp


class Record:
    """One request as the node saw it (wall-clock times, comparable across processes)."""

    __slots__ = ("method", "path", "json", "started_at", "finished_at", "client_closed_at",
                 "chunks_sent")

    def __init__(self, method: str, path: str, body: object) -> None:
        self.method, self.path, self.json = method, path, body
        self.started_at = time.time()
        self.finished_at: float | None = None
        self.client_closed_at: float | None = None
        self.chunks_sent = 0

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


class Node:
    """What the node serves and what it remembers: its models, pace and request records."""

    def __init__(self, models: list[str], chunks: int = 5, chunk_delay: float = 0.0,
                 embed_dim: int = 8, version: str = "0.12.3", records: int = 0) -> None:
        self.models = [m if ":" in m.rsplit("/", 1)[-1] else m + ":latest" for m in models]
        self.chunks, self.chunk_delay = chunks, chunk_delay
        self.embed_dim, self.version = embed_dim, version
        self.records: collections.deque[Record] | None = (
            collections.deque(maxlen=records) if records > 0 else None)
        self.loaded: dict[str, datetime] = {}  # model -> when /api/ps says it expires
        self.clock = Clock()
        self.tokens = [f"tok{i} " for i in range(chunks)]
        self._tags = _dumps({"models": [_tag_entry(name) for name in self.models]})

    def resolve(self, requested: str) -> str | None:
        """The listed name a request means ('llama3' is 'llama3:latest'), or None."""
        if requested in self.models:
            return requested
        tagged = requested + ":latest"
        return tagged if tagged in self.models else None

    def touch(self, name: str) -> None:
        self.loaded[name] = datetime.now().astimezone() + KEEP_ALIVE

    def tags(self) -> bytes:
        return self._tags

    def ps(self) -> bytes:
        running = sorted(self.loaded.items(), key=lambda item: item[1], reverse=True)
        return _dumps({"models": [
            {**_tag_entry(name), "expires_at": expires.isoformat(),
             "size_vram": _tag_entry(name)["size"], "context_length": CONTEXT_LENGTH}
            for name, expires in running]})


def _family(name: str) -> str:
    return "bert" if "embed" in name.lower() else name.split(":")[0].rsplit("/", 1)[-1]


def _tag_entry(name: str) -> dict[str, Any]:
    digest = hashlib.sha256(name.encode()).hexdigest()
    embedding = _family(name) == "bert"
    return {"name": name, "model": name, "modified_at": MODIFIED_AT,
            "size": 1_000_000_000 + int(digest[:6], 16) * 100, "digest": digest,
            "details": {"parent_model": "", "format": "gguf", "family": _family(name),
                        "families": [_family(name)],
                        "parameter_size": "137M" if embedding else "8.0B",
                        "quantization_level": "F16" if embedding else "Q4_K_M"}}


def _words(text: object) -> int:
    return max(1, len(text.split())) if isinstance(text, str) else 1


@functools.lru_cache(maxsize=4096)
def _vector(text: str, dim: int) -> bytes:
    """A deterministic, text-dependent, L2-normalised vector, JSON-encoded. Kept for texts
    seen again: a benchmark sends the same text over and over, and encoding floats would
    cost the node more than the rest of the answer."""
    data = b"".join(hashlib.sha256(f"{i}:{text}".encode()).digest()
                    for i in range((dim + 31) // 32))[:dim]
    raw = [byte / 127.5 - 1.0 for byte in data]
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    return _dumps([v / norm for v in raw])


class BadRequest(Exception):
    """An answer that ends the handling of a request early: a status and Ollama's error."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class Request:
    __slots__ = ("method", "path", "version", "headers", "body", "record")

    def __init__(self, method: str, path: str, version: str, headers: dict[str, str]) -> None:
        self.method, self.path, self.version, self.headers = method, path, version, headers
        self.body = b""
        self.record: Record | None = None

    @property
    def keep_alive(self) -> bool:
        connection = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.0":
            return "keep-alive" in connection
        return "close" not in connection


class Generation:
    """What /api/generate and /api/chat produce: the token lines, the final line and the
    whole `stream: false` answer, built as Ollama builds them."""

    def __init__(self, node: Node, requested: str, chat: bool, prompt_tokens: int,
                 raw: bool) -> None:
        self.node, self.requested, self.chat = node, requested, chat
        self.prompt_tokens, self.raw = prompt_tokens, raw
        self.started = time.monotonic()

    def _base(self, text: str, done: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.requested, "created_at": self.node.clock.stamp()}
        if self.chat:
            out["message"] = {"role": "assistant", "content": text}
        else:
            out["response"] = text
        out["done"] = done
        return out

    def line(self, index: int) -> bytes:
        return _dumps(self._base(self.node.tokens[index], False)) + b"\n"

    def final(self, text: str = "") -> dict[str, Any]:
        node = self.node
        out = self._base(text, True)
        out["done_reason"] = "stop"
        if not self.chat and not self.raw:
            out["context"] = list(range(1, self.prompt_tokens + node.chunks + 1))
        out.update(total_duration=int((time.monotonic() - self.started) * 1e9),
                   load_duration=0, prompt_eval_count=self.prompt_tokens,
                   prompt_eval_duration=1_000_000 * self.prompt_tokens,
                   eval_count=node.chunks,
                   eval_duration=int(node.chunks * node.chunk_delay * 1e9))
        return out

    def whole(self) -> bytes:
        return _dumps(self.final("".join(self.node.tokens)))


class Server(asyncio.Protocol):
    """One client connection: parse requests, answer them in order."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.closed = False
        self.request: Request | None = None  # the one whose body is being read
        self.body_left = 0  # Content-Length bytes still to come
        self.chunked = False  # reading a chunked body: `chunk_left` -1 = a size line next
        self.chunk_left = -1
        self.body_parts: list[bytes] = []
        self.body_size = 0
        self.busy: Request | None = None  # the request being answered over time
        self.task: asyncio.Task | None = None
        self.out: list[bytes] = []  # answers gathered while handling one read
        self.writable: asyncio.Future | None = None  # set while the transport is paused
        self.reading = True

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.busy is None:
            self._serve()
        elif len(self.buffer) > READ_PAUSE and self.reading:
            self.reading = False
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        return False  # a half-closed client is gone: close, as Go's server does

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.busy is not None and self.busy.record is not None:
            record = self.busy.record
            if record.finished_at is None:
                record.client_closed_at = time.time()
        if self.task is not None:
            self.task.cancel()
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)

    def pause_writing(self) -> None:
        self.writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)
        self.writable = None
        if self.busy is None and not self.closed:
            self._serve()

    # requests

    def _serve(self) -> None:
        """Answer every complete request in the buffer, in order, until one must take its
        time (a paced stream) or the client stops reading."""
        try:
            while not self.closed and self.busy is None and self.writable is None:
                request = self._parse()
                if request is None:
                    break
                self._dispatch(request)
        except BadRequest as exc:  # the framing is lost: answer and close
            self._answer(exc.status, _dumps({"error": exc.message}), JSON_TYPE, False)
            self._flush()
            self.transport.close()
            self.closed = True
            return
        self._flush()
        if self.busy is None and not self.reading and not self.closed:
            self.reading = True
            self.transport.resume_reading()

    def _flush(self) -> None:
        if self.out and not self.closed:
            self.transport.write(b"".join(self.out))
        self.out.clear()

    def _parse(self) -> Request | None:
        """The next whole request from the buffer, or None until more bytes arrive."""
        buf = self.buffer
        if self.request is None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    raise BadRequest(431, "request head too large")
                return None
            self.request = self._head(bytes(buf[:end]).decode("latin-1"))
            del buf[:end + 4]
        request = self.request
        if self.chunked:
            if not self._chunked_body():
                return None
        elif self.body_left:
            if len(buf) < self.body_left:
                return None
            self.body_parts.append(bytes(buf[:self.body_left]))
            del buf[:self.body_left]
            self.body_left = 0
        request.body = b"".join(self.body_parts)
        self.body_parts, self.body_size, self.request = [], 0, None
        return request

    def _head(self, text: str) -> Request:
        lines = text.split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise BadRequest(400, "malformed request line")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon or not name or name != name.strip():
                raise BadRequest(400, "malformed header line")
            headers[name.lower()] = value.strip()
        request = Request(parts[0], parts[1].split("?", 1)[0], parts[2], headers)
        coding = headers.get("transfer-encoding")
        if coding is not None:
            if coding.lower() != "chunked" or "content-length" in headers:
                raise BadRequest(501 if coding.lower() != "chunked" else 400,
                                 "unsupported transfer encoding")
            self.chunked, self.chunk_left = True, -1
        elif "content-length" in headers:
            length = headers["content-length"]
            if not length.isdigit():
                raise BadRequest(400, "bad Content-Length")
            self.body_left = int(length)
            if self.body_left > MAX_BODY:
                raise BadRequest(413, "request body too large")
        if headers.get("expect", "").lower() == "100-continue" and (
                self.chunked or self.body_left):
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return request

    def _chunked_body(self) -> bool:
        """Consume chunks from the buffer; True once the last chunk and its trailer are in."""
        buf = self.buffer
        while True:
            if self.chunk_left == -1:  # a size line
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD:
                        raise BadRequest(400, "chunk size line too long")
                    return False
                size_text = bytes(buf[:end]).split(b";", 1)[0].strip()
                try:
                    size = int(size_text, 16)
                except ValueError:
                    raise BadRequest(400, "bad chunk size") from None
                del buf[:end + 2]
                if size == 0:
                    self.chunk_left = -2  # the trailer section next
                    continue
                self.body_size += size
                if self.body_size > MAX_BODY:
                    raise BadRequest(413, "request body too large")
                self.chunk_left = size
            elif self.chunk_left == -2:  # trailer fields, then an empty line
                end = buf.find(b"\r\n")
                if end < 0:
                    return False
                del buf[:end + 2]
                if end == 0:
                    self.chunked, self.chunk_left = False, -1
                    return True
            else:
                if len(buf) < self.chunk_left + 2:
                    return False
                if buf[self.chunk_left:self.chunk_left + 2] != b"\r\n":
                    raise BadRequest(400, "chunk not followed by CRLF")
                self.body_parts.append(bytes(buf[:self.chunk_left]))
                del buf[:self.chunk_left + 2]
                self.chunk_left = -1

    def _answer(self, status: int, body: bytes, content_type: bytes | None,
                keep_alive: bool, head_only: bool = False) -> None:
        head = [b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, b"Unknown"))]
        if content_type:
            head.append(b"Content-Type: " + content_type + b"\r\n")
        head.append(b"Date: " + self.node.clock.date() + b"\r\n")
        head.append(b"Content-Length: %d\r\n" % len(body))
        if not keep_alive:
            head.append(b"Connection: close\r\n")
        head.append(b"\r\n")
        self.out.append(b"".join(head))
        if not head_only:
            self.out.append(body)

    def _done_with(self, request: Request) -> None:
        """After a complete answer: note it, and close when the request asked for it."""
        if request.record is not None:
            request.record.finished_at = time.time()
        if not request.keep_alive:
            self._flush()
            self.transport.close()
            self.closed = True

    def _dispatch(self, request: Request) -> None:
        node = self.node
        body: object = None
        error: str | None = None
        if request.body:
            try:
                body = json.loads(request.body)
            except ValueError as exc:
                error = f"invalid JSON: {exc}"
        if node.records is not None:
            request.record = Record(request.method, request.path, body)
            node.records.append(request.record)
        route = ROUTES.get(request.path)
        keep = request.keep_alive
        if route is None:
            self._answer(404, b'{"error":"404 page not found"}', JSON_TYPE, keep)
            return self._done_with(request)
        method, handler = route
        head_only = request.method == "HEAD" and method == "GET"
        if request.method != method and not head_only:
            self._answer(405, b'{"error":"405 method not allowed"}', JSON_TYPE, keep)
            return self._done_with(request)
        try:
            if method == "POST":
                if not request.body:
                    raise BadRequest(400, "missing request body")
                if error is not None:
                    raise BadRequest(400, error)
                if not isinstance(body, dict):
                    raise BadRequest(400, "json: cannot unmarshal into Go value of type "
                                          "api.Request")
            answer = handler(self, request, body)
        except BadRequest as exc:
            self._answer(exc.status, _dumps({"error": exc.message}), JSON_TYPE, keep)
            return self._done_with(request)
        if answer is None:
            return  # a stream under way: it ends the request itself
        payload, content_type = answer
        self._answer(200, payload, content_type, keep, head_only)
        self._done_with(request)

    # handlers: (payload, content type) for a whole answer, None for one under way

    def root(self, request: Request, body: object) -> tuple[bytes, bytes]:
        return b"Ollama is running", TEXT_TYPE

    def version(self, request: Request, body: object) -> tuple[bytes, bytes]:
        return _dumps({"version": self.node.version}), JSON_TYPE

    def tags(self, request: Request, body: object) -> tuple[bytes, bytes]:
        return self.node.tags(), JSON_TYPE

    def ps(self, request: Request, body: object) -> tuple[bytes, bytes]:
        return self.node.ps(), JSON_TYPE

    def records(self, request: Request, body: object) -> tuple[bytes, bytes]:
        return _dumps([r.as_dict() for r in self.node.records or ()]), JSON_TYPE

    def embed(self, request: Request, body: dict) -> tuple[bytes, bytes]:
        node, started = self.node, time.monotonic()
        requested = body.get("model")
        if not isinstance(requested, str) or not requested:
            raise BadRequest(400, "model is required")
        value = body.get("input", [])
        inputs = [value] if isinstance(value, str) and value else (
            [] if isinstance(value, str) else value)
        if not isinstance(inputs, list) or not all(isinstance(v, str) for v in inputs):
            raise BadRequest(400, "invalid input type")
        name = node.resolve(requested)
        if name is None:
            raise BadRequest(404, f'model "{requested}" not found, try pulling it first')
        node.touch(name)
        if not inputs:
            return _dumps({"model": requested, "embeddings": []}), JSON_TYPE
        vectors = b",".join(_vector(text, node.embed_dim) for text in inputs)
        rest = _dumps({"total_duration": int((time.monotonic() - started) * 1e9),
                       "load_duration": 0, "prompt_eval_count": sum(map(_words, inputs))})
        return (b'{"model":' + _dumps(requested) + b',"embeddings":[' + vectors + b"],"
                + rest[1:]), JSON_TYPE

    def generate(self, request: Request, body: dict) -> tuple[bytes, bytes] | None:
        prompt = body.get("prompt") or ""
        if not isinstance(prompt, str):
            raise BadRequest(400, "json: cannot unmarshal into Go struct field "
                                  "GenerateRequest.prompt of type string")
        return self._generation(request, body, False, _words(prompt) if prompt else 0)

    def chat(self, request: Request, body: dict) -> tuple[bytes, bytes] | None:
        messages = body.get("messages") or []
        if not isinstance(messages, list):
            raise BadRequest(400, "json: cannot unmarshal into Go struct field "
                                  "ChatRequest.messages of type []api.Message")
        tokens = sum(_words(m.get("content")) for m in messages if isinstance(m, dict))
        return self._generation(request, body, True, tokens if messages else 0)

    def _generation(self, request: Request, body: dict, chat: bool, prompt_tokens: int
                    ) -> tuple[bytes, bytes] | None:
        node = self.node
        requested = body.get("model")
        if not isinstance(requested, str) or not requested:
            raise BadRequest(400, "model is required")
        stream = body.get("stream", True)
        if not isinstance(stream, bool):
            raise BadRequest(400, "json: cannot unmarshal into Go struct field .stream of "
                                  "type bool")
        name = node.resolve(requested)
        if name is None:
            raise BadRequest(404, f"model '{requested}' not found")
        node.touch(name)
        gen = Generation(node, requested, chat, prompt_tokens, bool(body.get("raw")))
        if not prompt_tokens:  # an empty prompt (no messages) loads the model
            out = gen._base("", True)
            out["done_reason"] = "unload" if body.get("keep_alive") == 0 else "load"
            return _dumps(out), JSON_TYPE
        if node.chunk_delay <= 0:
            if not stream:
                if request.record is not None:
                    request.record.chunks_sent = node.chunks + 1
                return gen.whole(), JSON_TYPE
            self._stream_at_once(request, gen)
            return None
        self.busy = request
        self.task = asyncio.ensure_future(self._paced(request, gen, stream))
        return None

    # streams

    def _stream_head(self, keep_alive: bool) -> bytes:
        return (b"HTTP/1.1 200 OK\r\nContent-Type: " + NDJSON_TYPE + b"\r\nDate: "
                + self.node.clock.date() + b"\r\nTransfer-Encoding: chunked\r\n"
                + (b"" if keep_alive else b"Connection: close\r\n") + b"\r\n")

    @staticmethod
    def _chunk(line: bytes) -> bytes:
        return b"%x\r\n%s\r\n" % (len(line), line)

    def _stream_at_once(self, request: Request, gen: Generation) -> None:
        """No pace: every line its own HTTP chunk and its own write, as Ollama flushes each."""
        self._flush()
        write = self.transport.write
        write(self._stream_head(request.keep_alive))
        for index in range(self.node.chunks):
            write(self._chunk(gen.line(index)))
        write(self._chunk(_dumps(gen.final()) + b"\n") + b"0\r\n\r\n")
        if request.record is not None:
            request.record.chunks_sent = self.node.chunks + 1
        self._done_with(request)

    async def _paced(self, request: Request, gen: Generation, stream: bool) -> None:
        """A generation at the node's pace: the first line at once, then one every
        chunk_delay seconds (the final line too); `stream: false` waits the same time."""
        node, record = self.node, request.record
        try:
            if not stream:
                await asyncio.sleep(node.chunks * node.chunk_delay)
                self._answer(200, gen.whole(), JSON_TYPE, request.keep_alive)
                self._flush()
            else:
                self.transport.write(self._stream_head(request.keep_alive))
                for index in range(node.chunks + 1):
                    if index:
                        await asyncio.sleep(node.chunk_delay)
                    if self.writable is not None:
                        await self.writable
                    if self.closed:
                        return
                    last = index == node.chunks
                    line = _dumps(gen.final()) + b"\n" if last else gen.line(index)
                    self.transport.write(self._chunk(line) + (b"0\r\n\r\n" if last else b""))
                    if record is not None:
                        record.chunks_sent += 1
            self.busy = self.task = None
            self._done_with(request)
            if not self.closed:
                self._serve()
        except asyncio.CancelledError:
            pass  # the client left; connection_lost noted when


Handler = Callable[[Server, Request, Any], "tuple[bytes, bytes] | None"]
ROUTES: dict[str, tuple[str, Handler]] = {
    "/": ("GET", Server.root), "/api/version": ("GET", Server.version),
    "/api/tags": ("GET", Server.tags), "/api/ps": ("GET", Server.ps),
    "/api/generate": ("POST", Server.generate), "/api/chat": ("POST", Server.chat),
    "/api/embed": ("POST", Server.embed), "/_fake/requests": ("GET", Server.records),
}


def listen_socket(port: int, reuse_port: bool) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((HOST, port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


async def serve(node: Node, port: int, reuse_port: bool = False) -> None:
    loop = asyncio.get_running_loop()
    sock = listen_socket(port, reuse_port)
    server = await loop.create_server(lambda: Server(node), sock=sock, backlog=4096)
    print(f"listening on http://{HOST}:{sock.getsockname()[1]}", flush=True)
    done = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, done.set)
    await done.wait()
    server.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve a fast fake Ollama node until killed.")
    parser.add_argument("--port", type=int, default=11434, help="0 picks a free port")
    parser.add_argument("--models", default="llama3:latest", help="comma-separated names")
    parser.add_argument("--chunks", type=int, default=5, help="token lines of a generation")
    parser.add_argument("--chunk-delay", type=float, default=0.0,
                        help="seconds between a stream's lines (default none)")
    parser.add_argument("--embed-dim", type=int, default=8)
    parser.add_argument("--version", default="0.12.3", help="what /api/version reports")
    parser.add_argument("--records", type=int, default=0, metavar="N",
                        help="keep the last N requests for GET /_fake/requests (default none)")
    parser.add_argument("--reuse-port", action="store_true",
                        help="bind with SO_REUSEPORT (several processes on one port)")
    args = parser.parse_args(argv)
    node = Node([m for m in args.models.split(",") if m], chunks=args.chunks,
                chunk_delay=args.chunk_delay, embed_dim=args.embed_dim,
                version=args.version, records=args.records)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(node, args.port, args.reuse_port))
    else:
        uvloop.run(serve(node, args.port, args.reuse_port))


if __name__ == "__main__":
    main()
