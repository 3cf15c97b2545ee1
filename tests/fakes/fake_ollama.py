"""A fake Ollama node: a small Tornado app speaking Ollama's HTTP wire format.

Tests and benchmarks put it behind Aivonx instead of a real Ollama, which needs
a GPU and real models. It answers deterministically (tokens "tok0 ", "tok1 ",
...; embeddings derived from the text), can be told to misbehave (be slow,
fail, die mid-stream) through plain attributes read on every request, and
records every request it receives, including when its client went away.

The wire details follow /work/shared/ollama_api.md (sections 1, 4 and 5):
content types, chunked NDJSON and SSE flushed one line/event at a time, error
shapes, `stream` defaults, nanosecond durations, `model` echoed verbatim.
It also serves what newer Ollama serves: `/v1/messages` (Anthropic) and
`/v1/responses` (OpenAI Responses), translated from native chat chunks as Ollama
does (tests/fakes/dialects.py); `think`, `tools`, `format` and `logprobs` in
answers; `HEAD|POST /api/blobs/sha256:<hex>` and `/api/create` with `files`.

Run it alone for benchmarks:
    python -m tests.fakes.fake_ollama --port 11500 --models llama3:latest --chunks 20
With `--records N` it keeps its last N requests and serves them at GET /_fake/requests,
so a benchmark in another process can see when the node's client went away.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import hashlib
import itertools
import json
import math
import re
import signal
import struct
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Callable, Iterable, Iterator, MutableSequence

from tornado.httpserver import HTTPServer
from tornado.iostream import StreamClosedError
from tornado.netutil import bind_sockets
from tornado.web import Application, HTTPError, RequestHandler

from tests.fakes import dialects
from tests.fakes.dialects import Turn
from tests.fakes.prefix_cache import Lease, PrefixCache

DEFAULT_KEEP_ALIVE = 300.0  # Ollama's OLLAMA_KEEP_ALIVE default, 5m
FOREVER = timedelta(days=365 * 290)  # what a negative keep_alive becomes (Go's max duration)
MODIFIED_AT = "2025-05-04T17:37:44.706015-07:00"  # fixed, so listings are deterministic
MAX_BODY = 1 << 30  # Ollama has no body limit; tests send bodies over Tornado's 100 MB default
CONTEXT_LENGTH = 4096


@dataclass
class Recorded:
    """One request as the fake saw it, and how answering it went."""

    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    json: object | None  # parsed body if valid JSON
    started_at: float  # time.monotonic() when the handler began
    finished_at: float | None = None  # when the response completed normally
    client_closed_at: float | None = None  # when the client was seen closing the connection
    chunks_sent: int = 0  # chunks of the answer produced so far (see FakeOllama)


class FakeOllama:
    """One fake Ollama node listening on 127.0.0.1 in the current IOLoop.

    Knobs are plain attributes, read on every request, so a test may change
    them while the node runs:

    * ``chunks``: content chunks of a generation before its final chunk.
    * ``chunk_delay``: seconds between the chunks of any streamed answer. A
      ``stream: false`` generation is produced at the same pace, silently,
      and sent as one body at the end.
    * ``first_byte_delay``: seconds of total silence (no headers) before
      answering a request that loads a model (generate, chat, embed,
      embeddings, /v1 completions, chat, embeddings, messages and responses),
      like a model load.
      A client leaving meanwhile gets what Ollama answers, 499 "request
      canceled", into a closed socket.
    * ``fail_status``/``fail_message``: model-using requests (those above plus
      show, /v1/models and blob uploads) answer this status and
      ``{"error": fail_message}`` (the dialect's own shape on /v1), after body
      validation and first_byte_delay.
    * ``die_after``: close the TCP connection abruptly once this many chunks
      of an answer have been produced (no final chunk, no chunked-encoding
      terminator; for ``stream: false`` no response at all).
    * ``error_after``: once this many chunks have been produced, end the
      answer with an in-band error as Ollama does after streaming started:
      a final ``{"error": fail_message}`` line (a ``data:`` error event on
      /v1, an ``event: error`` on /v1/messages and /v1/responses) on the 200
      already sent; a ``stream: false`` answer, not yet
      started, is a 500 instead.

    * ``layer_lines``: when set, the layer progress lines pull and push send
      in place of their two regular layers (e.g. counts that go back or past
      their total, as a confused registry might send).

    * ``prefix_cache``: a PrefixCache (tests/fakes/prefix_cache.py), or None.
      When set, a generation waits its prefill time before answering: longer
      the less of its prompt the node has cached. GET /_fake/cache serves its
      counters; ``--prefix-cache-per-token`` sets it up from the command line.

    ``Recorded.chunks_sent`` counts the NDJSON lines/SSE events written (for
    ``stream: false``, the chunks generated so far).
    """

    models: list[str]  # names as /api/tags shows them, e.g. "llama3:latest"
    loaded: list[str]  # names /api/ps shows
    blobs: dict[str, bytes]  # uploaded through /api/blobs, by "sha256:<hex>"
    chunks: int
    chunk_delay: float
    first_byte_delay: float
    fail_status: int | None
    fail_message: str
    die_after: int | None
    error_after: int | None
    layer_lines: list[dict[str, Any]] | None
    requests: MutableSequence[Recorded]  # a bounded deque under --records
    keep_records: bool  # False stops recording (a long benchmark must not grow memory)

    def __init__(self, models: Iterable[str] = ("llama3:latest",), *, version: str = "0.12.3",
                 embed_dim: int = 8, chunks: int = 5, chunk_delay: float = 0.0,
                 first_byte_delay: float = 0.0, name: str | None = None) -> None:
        self.models = list(models)
        self.version = version
        self.embed_dim = embed_dim
        self.name = name
        self.port = 0
        self.url = ""
        self.requests = []
        self.keep_records = True
        # When set, generations wait out a prefill time that depends on what
        # the node has cached (tests/fakes/prefix_cache.py).
        self.prefix_cache: PrefixCache | None = None
        self.connections_accepted = 0  # TCP connections accepted since creation
        self._defaults = {"chunks": chunks, "chunk_delay": chunk_delay,
                          "first_byte_delay": first_byte_delay}
        self._expires: dict[str, datetime] = {}
        self._ids = itertools.count()
        self._server: HTTPServer | None = None
        args = {"node": self}
        self._app = Application([(path, handler, args) for path, handler in ROUTES],
                                default_handler_class=NotFound, default_handler_args=args)
        self.reset()

    def __repr__(self) -> str:
        return f"<FakeOllama {self.name or self.url or 'stopped'}>"

    async def start(self, port: int = 0, ssl_options: Any = None) -> FakeOllama:
        """Listen on 127.0.0.1 (0 = any free port); may be called again after stop().
        With ``ssl_options`` (an SSLContext) the node speaks HTTPS."""
        sockets = bind_sockets(port, "127.0.0.1")
        self._server = _CountingServer(self._app, max_body_size=MAX_BODY,
                                       max_buffer_size=MAX_BODY, ssl_options=ssl_options)
        self._server.node = self
        self._server.add_sockets(sockets)
        self.port = sockets[0].getsockname()[1]
        self.url = f"{'https' if ssl_options else 'http'}://127.0.0.1:{self.port}"
        return self

    @property
    def connections_open(self) -> int:
        """TCP connections from clients open now (HTTPServer's own set of them)."""
        return len(self._server._connections) if self._server is not None else 0

    async def stop(self) -> None:
        """Stop listening and drop every open connection, like a node that died."""
        server, self._server = self._server, None
        if server is not None:
            server.stop()
            await server.close_all_connections()

    def reset(self) -> None:
        """Forget the records and loaded models; put the knobs back to the constructor's values."""
        self.requests.clear()
        self.loaded = []
        self.blobs = {}
        self._expires.clear()
        for knob, value in self._defaults.items():
            setattr(self, knob, value)
        self.fail_status = None
        self.fail_message = "injected failure"
        self.die_after = None
        self.error_after = None
        self.layer_lines = None

    def requests_to(self, path: str) -> list[Recorded]:
        return [r for r in self.requests if r.path == path]

    def _resolve(self, requested: str) -> str | None:
        """The installed name a request means: the exact name or name + ':latest', any case,
        with Ollama's default registry host and `library/` namespace optional."""
        wanted = requested.strip().lower()
        for prefix in ("registry.ollama.ai/", "library/"):
            if wanted.startswith(prefix):
                wanted = wanted[len(prefix):]
        for name in self.models:
            if name.lower() in (wanted, wanted + ":latest"):
                return name
        return None

    def _touch(self, name: str, keep_alive: float | None) -> None:
        """Keep `name` loaded for keep_alive seconds (None: default, < 0: forever, 0: unload)."""
        if keep_alive == 0:
            if self.prefix_cache is not None:
                self.prefix_cache.forget(name)
            if name in self.loaded:
                self.loaded.remove(name)
            self._expires.pop(name, None)
            return
        if name not in self.loaded:
            self.loaded.append(name)
        ttl = FOREVER if keep_alive is not None and keep_alive < 0 else timedelta(
            seconds=DEFAULT_KEEP_ALIVE if keep_alive is None else keep_alive)
        self._expires[name] = _now() + ttl

    def _expiry(self, name: str) -> datetime:
        return self._expires.get(name) or _now() + timedelta(seconds=DEFAULT_KEEP_ALIVE)


class _CountingServer(HTTPServer):
    """An HTTPServer that counts the connections it accepts for its node."""

    node: FakeOllama

    def handle_stream(self, stream: Any, address: Any) -> None:
        self.node.connections_accepted += 1
        super().handle_stream(stream, address)


class ApiError(HTTPError):
    """An answer with an error status; the handler renders it in its API's error shape."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status)
        self.message = message


# ---------------------------------------------------------------- helpers


def _now() -> datetime:
    return datetime.now().astimezone()


def _stamp() -> str:
    """Ollama's `created_at`: RFC 3339 with the local offset."""
    return _now().isoformat()


def _dumps(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _display(name: str) -> str:
    """A name in /api/tags form: with its tag (':latest' when none is given)."""
    name = name.strip()
    return name if name.rfind(":") > name.rfind("/") else name + ":latest"


def _words(text: object) -> int:
    """A stand-in token count."""
    return max(1, len(text.split())) if isinstance(text, str) else 1


def _tokens(count: int) -> list[str]:
    return [f"tok{i} " for i in range(count)]


def _raw_vector(text: str, dim: int) -> list[float]:
    """Deterministic, text-dependent and not normalised (what /api/embeddings returns)."""
    blocks = (dim + 31) // 32  # sha256 gives 32 bytes a block
    data = b"".join(hashlib.sha256(f"{i}:{text}".encode()).digest() for i in range(blocks))
    return [byte / 127.5 - 1.0 for byte in data[:dim]]


def _unit_vector(text: str, dim: int, dimensions: int | None = None) -> list[float]:
    """The /api/embed and /v1/embeddings vector: L2-normalised, optionally truncated first."""
    vector = _raw_vector(text, dim)[:dimensions or None]
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return [v / norm for v in vector]


_DURATION = re.compile(r"[-+]?(?:(?:\d+\.?\d*|\.\d+)(?:ns|us|µs|ms|s|m|h))+")
_DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def _keep_alive(body: dict) -> float | None:
    """keep_alive in seconds, validated as Ollama does (number = seconds, or a Go duration)."""
    value = body.get("keep_alive")
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, str):
        raise ApiError(400, f"Unsupported type: '{type(value).__name__}'")
    if value.lstrip("+-") == "0":
        return 0.0
    if not _DURATION.fullmatch(value):
        problem = "missing unit in" if re.fullmatch(r"[-+]?[\d.]+", value) else "invalid"
        raise ApiError(400, f'time: {problem} duration "{value}"')
    seconds = sum(float(n) * _UNITS[u] for n, u in _DURATION_PART.findall(value))
    return -seconds if value.startswith("-") else seconds


def _family(name: str) -> str:
    base = name.rsplit("/", 1)[-1].split(":")[0].lower()
    return "bert" if "embed" in base else (re.match(r"[a-z]*", base).group() or "llama")


def _details(name: str) -> dict[str, Any]:
    family = _family(name)
    embedding = family == "bert"
    return {"parent_model": "", "format": "gguf", "family": family, "families": [family],
            "parameter_size": "137M" if embedding else "8.0B",
            "quantization_level": "F16" if embedding else "Q4_K_M"}


def _tag_entry(name: str) -> dict[str, Any]:
    """One /api/tags entry; digest and size derive from the name so they are stable."""
    digest = hashlib.sha256(name.encode()).hexdigest()
    return {"name": name, "model": name, "modified_at": MODIFIED_AT,
            "size": 1_000_000_000 + int(digest[:6], 16) * 100, "digest": digest,
            "details": _details(name)}


GO_TYPES = {str: "string", bool: "bool", int: "number", float: "number", list: "array",
            dict: "object", type(None): "null"}


# ---------------------------------------------------------------- handlers


class Handler(RequestHandler):
    """Plumbing shared by every route: recording, error bodies, pacing, client-gone tracking."""

    stream_type = "application/x-ndjson"

    def initialize(self, node: FakeOllama) -> None:
        # Here rather than in prepare(): an unknown method fails before prepare, and
        # Tornado builds the handler only once the whole body has arrived.
        self.node = node
        body = self.request.body
        try:
            parsed, self._json_error = json.loads(body), None
        except (ValueError, RecursionError) as exc:  # RecursionError: absurd nesting
            parsed, self._json_error = None, str(exc)
        self.record = Recorded(self.request.method or "", self.request.path,
                               {k.lower(): v for k, v in self.request.headers.items()},
                               body, parsed, time.monotonic())
        if node.keep_records:
            node.requests.append(self.record)
        self._gone = asyncio.Event()
        self._killed = False
        self._lease: Lease | None = None

    def set_default_headers(self) -> None:
        # Go's net/http sends neither; an empty body must not claim text/html.
        self.clear_header("Server")
        self.clear_header("Content-Type")

    def compute_etag(self) -> None:
        return None  # Ollama sends no ETag and never answers 304

    def on_connection_close(self) -> None:
        """Also runs while the handler sleeps, so a client leaving is seen at once."""
        self._gone.set()
        self._release_cache()
        server_side = self._killed or self.node._server is None  # die_after or stop()
        if not server_side and self.record.finished_at is None:
            self.record.client_closed_at = time.monotonic()

    def _release_cache(self) -> None:
        if self._lease is not None:
            self._lease.release()

    def on_finish(self) -> None:
        self._release_cache()
        if not (self._killed or self._gone.is_set()):
            self.record.finished_at = time.monotonic()

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        error = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(error, ApiError):
            self._json(self._error_body(status_code, error.message))
        elif status_code in (404, 405):  # gin's own plain-text answers
            self.set_header("Content-Type", "text/plain")
            self.write("404 page not found" if status_code == 404 else "405 method not allowed")
        else:
            self._json(self._error_body(status_code, self._reason))

    def _error_body(self, status: int, message: str) -> object:
        return {"error": message}

    def _encode(self, event: object) -> bytes:
        return _dumps(event) + b"\n"

    def _stream_error(self, message: str) -> bytes:
        """How an answer that already began streaming reports a failure."""
        return self._encode(self._error_body(500, message))

    def _json(self, value: object) -> None:
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.write(_dumps(value))

    def _body(self) -> dict[str, Any]:
        """The JSON request body, refused the way Ollama refuses it."""
        if not self.request.body:
            raise ApiError(400, "missing request body")
        if self._json_error is not None:
            raise ApiError(400, f"invalid JSON: {self._json_error}")
        if not isinstance(self.record.json, dict):
            kind = GO_TYPES.get(type(self.record.json), "value")
            raise ApiError(400, f"json: cannot unmarshal {kind} into Go value of type api.Request")
        return self.record.json

    @staticmethod
    def _field(body: dict, key: str, kinds: type | tuple[type, ...], default: Any = None) -> Any:
        value = body.get(key)
        if value is None:
            return default
        if not isinstance(value, kinds):
            want = GO_TYPES[kinds[0] if isinstance(kinds, tuple) else kinds]
            raise ApiError(400, f"json: cannot unmarshal {GO_TYPES.get(type(value), 'value')} "
                                f"into Go struct field .{key} of type {want}")
        return value

    def _model(self, body: dict, *legacy: str) -> str:
        for key in ("model", *legacy):
            if name := self._field(body, key, str, ""):
                return name
        raise ApiError(400, "model is required")

    async def _pause(self, seconds: float) -> bool:
        """Sleep, waking early if the client leaves; True if it is still there."""
        if seconds > 0 and not self._gone.is_set():
            try:
                await asyncio.wait_for(self._gone.wait(), seconds)
            except asyncio.TimeoutError:
                pass
        return not self._gone.is_set()

    async def _admit(self, requested: str, not_found: str, load: bool = True) -> str:
        """What the scheduler does before an answer: find the model, 'load' it, maybe fail."""
        name = self.node._resolve(requested)
        if name is None:
            raise ApiError(404, not_found)
        if load and not await self._pause(self.node.first_byte_delay):
            raise ApiError(499, "request canceled")
        if load and self.node.prefix_cache is not None:
            self._lease = self.node.prefix_cache.admit(name, self.record.json)
            if not await self._pause(self._lease.delay):
                raise ApiError(499, "request canceled")
        if self.node.fail_status is not None:
            raise ApiError(self.node.fail_status, self.node.fail_message)
        return name

    async def _produce(self, events: Iterable[object], stream: bool,
                       whole: Callable[[], object]) -> None:
        """Produce an answer chunk by chunk, paced by chunk_delay, honouring die_after and
        error_after; stream: write and flush each chunk on its own; else send whole() at the end.
        """
        node, record = self.node, self.record
        if stream:
            self.set_header("Content-Type", self.stream_type)
        for event in events:
            if record.chunks_sent and not await self._pause(node.chunk_delay):
                return
            if node.die_after is not None and record.chunks_sent >= node.die_after:
                self._killed = True
                self.request.connection.stream.close()
                return
            failing = node.error_after is not None and record.chunks_sent >= node.error_after
            if failing and not stream:
                raise ApiError(500, node.fail_message)
            if stream:
                self.write(self._stream_error(node.fail_message) if failing
                           else self._encode(event))
                try:
                    await self.flush()
                except StreamClosedError:
                    return
            record.chunks_sent += 1
            if failing:
                return
        if not stream:
            self._json(whole())

    def _metrics(self, prompt_tokens: int) -> dict[str, int]:
        node = self.node
        return {"total_duration": int((time.monotonic() - self.record.started_at) * 1e9),
                "load_duration": int(node.first_byte_delay * 1e9),
                "prompt_eval_count": prompt_tokens,
                "prompt_eval_duration": 1_000_000 * prompt_tokens,
                "eval_count": node.chunks,
                "eval_duration": int(node.chunks * node.chunk_delay * 1e9)}


class NotFound(Handler):
    def prepare(self) -> None:
        raise HTTPError(404)


class Root(Handler):
    def get(self) -> None:
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.write("Ollama is running")

    head = get  # Tornado drops the body of a HEAD answer, keeping its Content-Length


class Version(Handler):
    def get(self) -> None:
        self._json({"version": self.node.version})

    head = get


class Tags(Handler):
    def get(self) -> None:
        self._json({"models": [_tag_entry(name) for name in self.node.models]})

    head = get


class Ps(Handler):
    def get(self) -> None:
        running = sorted(self.node.loaded, key=self.node._expiry, reverse=True)  # longest first
        self._json({"models": [self._entry(name) for name in running]})

    def _entry(self, name: str) -> dict[str, Any]:
        entry = _tag_entry(name)
        return {**entry, "expires_at": self.node._expiry(name).isoformat(),
                "size_vram": entry["size"], "context_length": CONTEXT_LENGTH}


class Show(Handler):
    async def post(self) -> None:
        requested = self._model(self._body(), "name")
        name = await self._admit(requested, f"model '{_display(requested)}' not found",
                                 load=False)
        family = _family(name)
        self._json({
            "license": "", "modelfile": f'# Modelfile generated by "ollama show"\nFROM {name}\n',
            "parameters": 'stop "<|eot_id|>"', "template": "{{ .Prompt }}",
            "details": _details(name),
            "model_info": {"general.architecture": family,
                           f"{family}.context_length": CONTEXT_LENGTH,
                           f"{family}.embedding_length": self.node.embed_dim},
            "capabilities": ["embedding"] if family == "bert" else ["completion"],
            "modified_at": MODIFIED_AT})


def _think(body: dict) -> bool:
    """`think` is a bool or a level ("low", "medium", "high")."""
    value = body.get("think")
    return bool(value) and value != "false"


def _native_turn(body: dict, tokens: list[str]) -> Turn:
    """The turn a native request asks for: thinking, tool calls, format, logprobs."""
    tools = [(t["function"].get("name", ""), t["function"].get("parameters"))
             for t in body.get("tools") or []
             if isinstance(t, dict) and isinstance(t.get("function"), dict)]
    messages = body.get("messages") or []
    last = messages[-1] if messages and isinstance(messages[-1], dict) else {}
    top = body.get("top_logprobs")
    return Turn(tokens, think=_think(body), tools=tools,
                answered_tool=last.get("role") == "tool", schema=body.get("format") or None,
                logprobs=(top if isinstance(top, int) else 0) if body.get("logprobs") else None)


class ChatTurn(Handler):
    """Answers built from native chat chunks (/api/chat and the dialects Ollama translates)."""

    def _chat_chunks(self, requested: str, turn: Turn, prompt_tokens: int
                     ) -> tuple[Iterator[dict[str, Any]], Callable[[], dict[str, Any]]]:
        """The streamed native chunks, and the whole `stream: false` answer."""
        def chunk(message: dict, logprobs: list | None = None,
                  done: bool = False) -> dict[str, Any]:
            out = {"model": requested, "created_at": _stamp(), "message": message, "done": done}
            if logprobs is not None:
                out["logprobs"] = logprobs
            if done:
                out.update(done_reason="stop", **self._metrics(prompt_tokens))
            return out

        def events() -> Iterator[dict[str, Any]]:
            for message, logprobs in turn.messages():
                yield chunk(message, logprobs)
            # built when reached, so its durations are real
            yield chunk({"role": "assistant", "content": ""}, None, True)

        return events(), lambda: chunk(*turn.whole(), done=True)


class Generate(Handler):
    async def post(self) -> None:
        body = self._body()
        requested = self._field(body, "model", str, "")
        prompt = self._field(body, "prompt", str, "")
        stream = self._field(body, "stream", bool, True)
        keep_alive = _keep_alive(body)
        name = await self._admit(requested, f"model '{requested}' not found")
        self.node._touch(name, keep_alive)
        if not prompt:
            reason = "unload" if keep_alive == 0 else "load"
            return self._json({"model": requested, "created_at": _stamp(), "response": "",
                               "done": True, "done_reason": reason})
        turn = _native_turn({**body, "tools": None}, _tokens(self.node.chunks))
        prompt_tokens = _words(prompt)

        def chunk(text: str, thinking: str = "", logprobs: list | None = None,
                  done: bool = False) -> dict[str, Any]:
            out = {"model": requested, "created_at": _stamp(), "response": text, "done": done}
            if thinking:
                out["thinking"] = thinking
            if logprobs is not None:
                out["logprobs"] = logprobs
            if done:
                out["done_reason"] = "stop"
                if not body.get("raw"):
                    out["context"] = list(range(1, prompt_tokens + len(turn.content) + 1))
                out.update(self._metrics(prompt_tokens))
            return out

        def events() -> Iterator[dict[str, Any]]:
            for message, logprobs in turn.messages():
                yield chunk(message["content"], message.get("thinking", ""), logprobs)
            yield chunk("", done=True)  # built when reached, so its durations are real

        def whole() -> dict[str, Any]:
            message, logprobs = turn.whole()
            return chunk(message["content"], message.get("thinking", ""), logprobs, True)

        await self._produce(events(), stream, whole)


class Chat(ChatTurn):
    async def post(self) -> None:
        body = self._body()
        requested = self._model(body)
        messages = self._field(body, "messages", list, [])
        stream = self._field(body, "stream", bool, True)
        keep_alive = _keep_alive(body)
        name = await self._admit(requested, f"model '{requested}' not found")
        self.node._touch(name, keep_alive)
        if not messages:
            reason = "unload" if keep_alive == 0 else "load"
            return self._json({"model": requested, "created_at": _stamp(),
                               "message": {"role": "assistant", "content": ""},
                               "done": True, "done_reason": reason})
        prompt_tokens = sum(_words(m.get("content")) for m in messages if isinstance(m, dict))
        events, whole = self._chat_chunks(requested, _native_turn(body, _tokens(
            self.node.chunks)), prompt_tokens)
        await self._produce(events, stream, whole)


def _inputs(value: object) -> list[str] | None:
    """An embed `input` as a list of strings, or None if it is neither a string nor strings."""
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return None


class Embed(Handler):
    async def post(self) -> None:
        body = self._body()
        requested = self._model(body)
        inputs = _inputs(body.get("input", []))
        if inputs is None:
            raise ApiError(400, "invalid input type")
        dimensions = self._field(body, "dimensions", int)
        keep_alive = _keep_alive(body)
        name = await self._admit(requested,
                                 f'model "{requested}" not found, try pulling it first')
        self.node._touch(name, keep_alive)
        if not inputs:
            return self._json({"model": requested, "embeddings": []})
        vectors = [_unit_vector(text, self.node.embed_dim, dimensions) for text in inputs]
        self._json({"model": requested, "embeddings": vectors,
                    "total_duration": int((time.monotonic() - self.record.started_at) * 1e9),
                    "load_duration": int(self.node.first_byte_delay * 1e9),
                    "prompt_eval_count": sum(map(_words, inputs))})


class Embeddings(Handler):
    async def post(self) -> None:
        body = self._body()
        requested = self._model(body)
        prompt = self._field(body, "prompt", str, "")
        keep_alive = _keep_alive(body)
        name = await self._admit(requested,
                                 f'model "{requested}" not found, try pulling it first')
        self.node._touch(name, keep_alive)
        self._json({"embedding": _raw_vector(prompt, self.node.embed_dim) if prompt else []})


class Progress(Handler):
    """pull, push and create: a stream of status lines ending in success."""

    def _steps(self, name: str) -> Iterator[dict[str, Any]]:
        raise NotImplementedError

    async def post(self) -> None:
        body = self._body()
        name = _display(self._model(body, "name"))
        stream = self._field(body, "stream", bool, True)
        await self._produce(self._steps(name), stream, lambda: {"status": "success"})

    def _layers(self, name: str, verb: str) -> Iterator[dict[str, Any]]:
        if self.node.layer_lines is not None:
            yield from (dict(line) for line in self.node.layer_lines)
            return
        for layer in range(2):
            digest = "sha256:" + hashlib.sha256(f"{name}/{layer}".encode()).hexdigest()
            total = 1_000_000 * (layer + 1)
            for completed in (total // 2, total):  # Ollama omits completed while it is 0
                yield {"status": f"{verb} {digest[7:19]}", "digest": digest, "total": total,
                       "completed": completed}

    def _install(self, name: str) -> dict[str, str]:
        """The success line; the model exists from then on (not if the stream was cut)."""
        if self.node._resolve(name) is None:
            self.node.models.append(name)
        return {"status": "success"}


class Pull(Progress):
    def _steps(self, name: str) -> Iterator[dict[str, Any]]:
        yield {"status": "pulling manifest"}
        yield from self._layers(name, "pulling")
        yield {"status": "verifying sha256 digest"}
        yield {"status": "writing manifest"}
        yield self._install(name)


class Create(Progress):
    async def post(self) -> None:
        files = self._field(self._body(), "files", dict, {})
        for path, digest in files.items():
            if not isinstance(digest, str) or _digest(digest) is None:
                raise ApiError(400, "invalid digest format")
            if _digest(digest) not in self.node.blobs:
                raise ApiError(400, f'blob "{digest}" not found: upload it to /api/blobs first')
        await super().post()

    def _steps(self, name: str) -> Iterator[dict[str, Any]]:
        for digest in self._field(self.record.json, "files", dict, {}).values():
            yield {"status": f"using existing layer {_digest(digest)}"}
        yield {"status": "reading model metadata"}
        yield {"status": "creating system layer"}
        yield {"status": "writing manifest"}
        yield self._install(name)


class Push(Progress):
    def _steps(self, name: str) -> Iterator[dict[str, Any]]:
        yield {"status": "retrieving manifest"}
        yield from self._layers(name, "pushing")
        yield {"status": "pushing manifest"}
        yield {"status": "success"}


class Copy(Handler):
    def post(self) -> None:
        body = self._body()
        source = self._field(body, "source", str, "")
        destination = self._field(body, "destination", str, "")
        for role, value in (("source", source), ("destination", destination)):
            if not value.strip():
                raise ApiError(400, f'{role} "{value}" is invalid')
        if self.node._resolve(source) is None:
            raise ApiError(404, f'model "{source}" not found')
        if self.node._resolve(destination) is None:
            self.node.models.append(_display(destination))
        # 200 with an empty body, as Ollama answers


class Delete(Handler):
    def delete(self) -> None:
        requested = self._model(self._body(), "name")
        name = self.node._resolve(requested)
        if name is None:
            raise ApiError(404, f"model '{requested}' not found")
        self.node.models.remove(name)
        self.node._touch(name, 0)
        # 200 with an empty body, as Ollama answers


_DIGEST = re.compile(r"sha256[:-]([0-9a-fA-F]{64})")


def _digest(value: str) -> str | None:
    """A blob digest in `sha256:<hex>` form, or None if it is not one (`sha256-` is accepted)."""
    match = _DIGEST.fullmatch(value)
    return f"sha256:{match.group(1).lower()}" if match else None


class Blob(Handler):
    """HEAD: is the blob here; POST: store the body under its digest, verified."""

    def _checked(self, digest: str) -> str:
        checked = _digest(digest)
        if checked is None:
            raise ApiError(400, "invalid digest format")
        return checked

    def head(self, digest: str) -> None:
        if self._checked(digest) not in self.node.blobs:
            raise ApiError(404, f'blob "{digest}" not found')

    def post(self, digest: str) -> None:
        checked = self._checked(digest)
        if self.node.fail_status is not None:
            raise ApiError(self.node.fail_status, self.node.fail_message)
        if checked in self.node.blobs:
            return  # 200: it exists already
        actual = "sha256:" + hashlib.sha256(self.request.body).hexdigest()
        if actual != checked:
            raise ApiError(400, f'digest mismatch, expected "{checked}", got "{actual}"')
        self.node.blobs[checked] = self.request.body
        self.set_status(201)


# ---------------------------------------------------------------- OpenAI-compatible /v1


class OpenAIHandler(Handler):
    stream_type = "text/event-stream"

    def _error_body(self, status: int, message: str) -> object:
        kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
        return {"error": {"message": message, "type": kind, "param": None, "code": None}}

    def _encode(self, event: object) -> bytes:
        return b"data: " + (b"[DONE]" if event == "[DONE]" else _dumps(event)) + b"\n\n"


class OpenAIGenerate(OpenAIHandler):
    """/v1/chat/completions and /v1/completions; subclasses say how their choices look."""

    id_prefix: str
    object_name: str  # the non-streamed object
    chunk_object: str  # the streamed chunks

    def _prompt_tokens(self, body: dict) -> int:
        raise NotImplementedError

    def _choice(self, text: str | None, finish: str | None, stream: bool) -> dict[str, Any]:
        raise NotImplementedError

    async def post(self) -> None:
        body = self._body()
        requested = self._model(body)
        prompt_tokens = self._prompt_tokens(body)
        stream = self._field(body, "stream", bool, False)
        include_usage = self._field(body, "stream_options", dict, {}).get("include_usage")
        name = await self._admit(requested, f"model '{requested}' not found")
        self.node._touch(name, None)
        tokens = _tokens(self.node.chunks)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(tokens),
                 "total_tokens": prompt_tokens + len(tokens)}
        head = {"id": f"{self.id_prefix}-{next(self.node._ids) % 999}",
                "object": self.chunk_object if stream else self.object_name,
                "created": int(time.time()), "model": requested,
                "system_fingerprint": "fp_ollama"}
        ending = [{**head, "choices": [self._choice(None, "stop", True)]}]
        if include_usage:
            ending.append({**head, "choices": [], "usage": usage})
        events = itertools.chain(
            ({**head, "choices": [self._choice(token, None, True)]} for token in tokens),
            ending, ["[DONE]"])
        await self._produce(events, stream, lambda: {
            **head, "choices": [self._choice("".join(tokens), "stop", False)], "usage": usage})


class OpenAIChat(OpenAIGenerate):
    id_prefix, object_name, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def _prompt_tokens(self, body: dict) -> int:
        messages = self._field(body, "messages", list, [])
        if not messages:
            raise ApiError(400, "[] is too short - 'messages'")
        return sum(_words(m.get("content")) for m in messages if isinstance(m, dict))

    def _choice(self, text: str | None, finish: str | None, stream: bool) -> dict[str, Any]:
        if not stream:
            return {"index": 0, "message": {"role": "assistant", "content": text},
                    "finish_reason": finish}
        delta = {} if text is None else {"role": "assistant", "content": text}
        return {"index": 0, "delta": delta, "finish_reason": finish}


class OpenAICompletions(OpenAIGenerate):
    id_prefix, object_name, chunk_object = "cmpl", "text_completion", "text_completion"

    def _prompt_tokens(self, body: dict) -> int:
        return _words(self._field(body, "prompt", (str, list), ""))

    def _choice(self, text: str | None, finish: str | None, stream: bool) -> dict[str, Any]:
        return {"text": text or "", "index": 0, "finish_reason": finish}


class OpenAIEmbeddings(OpenAIHandler):
    async def post(self) -> None:
        body = self._body()
        requested = self._model(body)
        inputs = _inputs(body.get("input"))
        if not inputs or not all(inputs):
            raise ApiError(400, "invalid input")
        encoding = self._field(body, "encoding_format", str, "float")
        if encoding not in ("float", "base64"):
            raise ApiError(400, f"Invalid value for 'encoding_format' = {encoding}. "
                                "Supported values: ['float', 'base64'].")
        dimensions = self._field(body, "dimensions", int)
        name = await self._admit(requested,
                                 f'model "{requested}" not found, try pulling it first')
        self.node._touch(name, None)
        data = []
        for index, text in enumerate(inputs):
            vector = _unit_vector(text, self.node.embed_dim, dimensions)
            if encoding == "base64":  # little-endian float32, as OpenAI does
                vector = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "embedding": vector, "index": index})
        tokens = sum(map(_words, inputs))
        self._json({"object": "list", "data": data, "model": requested,
                    "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def _openai_model(model_id: str, name: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model",
            "created": int(datetime.fromisoformat(MODIFIED_AT).timestamp()),
            "owned_by": name.split("/")[-2] if "/" in name else "library"}


class OpenAIModels(OpenAIHandler):
    def get(self) -> None:
        if self.node.fail_status is not None:
            raise ApiError(self.node.fail_status, self.node.fail_message)
        # Ollama answers `data: null`, not [], when there are no models.
        data = [_openai_model(name, name) for name in self.node.models] or None
        self._json({"object": "list", "data": data})


class OpenAIModel(OpenAIHandler):
    async def get(self, model: str) -> None:
        name = await self._admit(model, f"model '{model}' not found", load=False)
        self._json(_openai_model(model, name))


class SSEDialect(ChatTurn):
    """A dialect Ollama translates from native chat chunks into named SSE events."""

    stream_type = "text/event-stream"

    def _encode(self, event: object) -> bytes:
        kind, data = event
        return b"event: " + kind.encode() + b"\ndata: " + _dumps(data) + b"\n\n"


def _text_words(value: object) -> int:
    """Words in a string, or in the text parts of a list of content blocks / input items."""
    if isinstance(value, str):
        return _words(value)
    if isinstance(value, list):
        return sum(_text_words(v.get("text", v.get("content"))) if isinstance(v, dict)
                   else _text_words(v) for v in value)
    return 0


class AnthropicMessages(SSEDialect):
    """POST /v1/messages, the Anthropic Messages API as Ollama serves it; errors in
    Anthropic's shape. A failure after the stream began ends it with an `error` event,
    as Anthropic's API does."""

    def _error_body(self, status: int, message: str) -> object:
        return dialects.anthropic_error(status, message)

    def _stream_error(self, message: str) -> bytes:
        return self._encode(("error", dialects.anthropic_error(500, message)))

    async def post(self) -> None:
        body = self._body()
        requested = self._field(body, "model", str, "")
        if not requested:
            raise ApiError(400, "model is required")
        if self._field(body, "max_tokens", int, 0) <= 0:
            raise ApiError(400, "max_tokens is required and must be positive")
        messages = self._field(body, "messages", list, [])
        if not messages:
            raise ApiError(400, "messages is required")
        stream = self._field(body, "stream", bool, False)
        thinking = self._field(body, "thinking", dict, {})
        name = await self._admit(requested, f"model '{requested}' not found")
        self.node._touch(name, None)
        turn = Turn(_tokens(self.node.chunks), think=thinking.get("type") == "enabled",
                    tools=dialects.anthropic_tools(body.get("tools")),
                    answered_tool=dialects.anthropic_answered_tool(messages))
        prompt_tokens = max(1, sum(_text_words(m.get("content")) for m in messages
                                   if isinstance(m, dict)))
        chunks, whole = self._chat_chunks(requested, turn, prompt_tokens)
        msg_id = dialects.message_id()
        converter = dialects.AnthropicStream(msg_id, requested, prompt_tokens)
        events = (event for chunk in chunks for event in converter.process(chunk))
        await self._produce(events, stream,
                            lambda: dialects.anthropic_message(msg_id, requested, whole()))


class OpenAIResponses(SSEDialect):
    """POST /v1/responses, the stateless OpenAI Responses API as Ollama serves it."""

    converter: dialects.Responses | None = None

    _error_body = OpenAIHandler._error_body

    def _stream_error(self, message: str) -> bytes:
        assert self.converter is not None
        return self._encode(self.converter.error_event(message))

    async def post(self) -> None:
        body = self._body()
        requested = self._model(body)
        stream = self._field(body, "stream", bool, False)
        items = body.get("input")
        reasoning = self._field(body, "reasoning", dict, {})
        text_format = (self._field(body, "text", dict, {}).get("format") or {})
        name = await self._admit(requested, f"model '{requested}' not found")
        self.node._touch(name, None)
        schema = text_format.get("schema") if text_format.get("type") == "json_schema" else None
        turn = Turn(_tokens(self.node.chunks), think=bool(reasoning.get("effort")),
                    tools=dialects.responses_tools(body.get("tools")),
                    answered_tool=dialects.responses_answered_tool(items),
                    schema=schema or ("json" if text_format.get("type") == "json_object"
                                      else None))
        chunks, whole = self._chat_chunks(requested, turn, dialects.responses_input_tokens(items))
        self.converter = converter = dialects.Responses(requested, body)
        events = (event for chunk in chunks for event in converter.process(chunk))
        await self._produce(events, stream, lambda: converter.whole(whole()))


class Records(Handler):
    """GET /_fake/requests: the recorded requests as JSON, for a process that cannot read
    `FakeOllama.requests` (a benchmark). Times are wall-clock (time.time()) so that they
    compare with the other process's own clock."""

    def get(self) -> None:
        shift = time.time() - time.monotonic()

        def wall(moment: float | None) -> float | None:
            return None if moment is None else moment + shift

        self._json([{"method": r.method, "path": r.path, "json": r.json,
                     "started_at": wall(r.started_at), "finished_at": wall(r.finished_at),
                     "client_closed_at": wall(r.client_closed_at), "chunks_sent": r.chunks_sent}
                    for r in self.node.requests])


class CacheStats(Handler):
    """GET /_fake/cache: the prefix cache's counters (404 when it has none)."""

    def get(self) -> None:
        if self.node.prefix_cache is None:
            raise ApiError(404, "no prefix cache")
        self._json(self.node.prefix_cache.stats())


ROUTES: list[tuple[str, type[Handler]]] = [
    (r"/", Root), (r"/api/version", Version), (r"/api/tags", Tags), (r"/api/ps", Ps),
    (r"/api/show", Show), (r"/api/generate", Generate), (r"/api/chat", Chat),
    (r"/api/embed", Embed), (r"/api/embeddings", Embeddings), (r"/api/pull", Pull),
    (r"/api/push", Push), (r"/api/create", Create), (r"/api/copy", Copy),
    (r"/api/delete", Delete), (r"/v1/chat/completions", OpenAIChat),
    (r"/v1/completions", OpenAICompletions), (r"/v1/embeddings", OpenAIEmbeddings),
    (r"/v1/models", OpenAIModels), (r"/v1/models/([^/]+)", OpenAIModel),
    (r"/v1/messages", AnthropicMessages), (r"/v1/responses", OpenAIResponses),
    (r"/api/blobs/([^/]+)", Blob),
    (r"/_fake/requests", Records), (r"/_fake/cache", CacheStats),
]


# ---------------------------------------------------------------- command line


async def _serve(args: argparse.Namespace) -> None:
    node = FakeOllama([m for m in args.models.split(",") if m], version=args.version,
                      embed_dim=args.embed_dim, chunks=args.chunks,
                      chunk_delay=args.chunk_delay, first_byte_delay=args.first_byte_delay)
    # Only the last --records requests are kept: a long benchmark must not grow memory.
    node.keep_records = args.records > 0
    node.requests = collections.deque(maxlen=args.records)
    if args.prefix_cache_per_token is not None:
        node.prefix_cache = PrefixCache(slots=args.prefix_cache_slots,
                                        per_token=args.prefix_cache_per_token,
                                        base=args.prefix_cache_base)
    await node.start(args.port)
    print(f"listening on {node.url}", flush=True)
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, done.set)
    await done.wait()
    await node.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve a fake Ollama node until killed.")
    parser.add_argument("--port", type=int, default=11434, help="0 picks a free port")
    parser.add_argument("--models", default="llama3:latest", help="comma-separated names")
    parser.add_argument("--chunks", type=int, default=5)
    parser.add_argument("--chunk-delay", type=float, default=0.0)
    parser.add_argument("--first-byte-delay", type=float, default=0.0)
    parser.add_argument("--embed-dim", type=int, default=8)
    parser.add_argument("--version", default="0.12.3", help="what /api/version reports")
    parser.add_argument("--records", type=int, default=0, metavar="N",
                        help="keep the last N requests for GET /_fake/requests (default none)")
    parser.add_argument("--prefix-cache-per-token", type=float, default=None, metavar="S",
                        help="model a prompt cache: prefill takes S seconds per prompt token "
                             "not cached (default: no cache model)")
    parser.add_argument("--prefix-cache-base", type=float, default=0.02, metavar="S",
                        help="seconds before the first chunk on top of the prefill")
    parser.add_argument("--prefix-cache-slots", type=int, default=4,
                        help="cached prompts per model (Ollama's parallel slots)")
    asyncio.run(_serve(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
