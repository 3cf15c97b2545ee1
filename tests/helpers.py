"""Helpers the tests share: HTTP calls, waiting, and test nodes and Aivonx
processes started the way an admin would."""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from http.cookies import SimpleCookie
from typing import Any, AsyncIterator
from urllib.parse import urlencode

import ollama
import openai
from tornado.httpclient import AsyncHTTPClient, HTTPRequest, HTTPResponse
from tornado.tcpclient import TCPClient

from tests.fakes.fake_ollama import FakeOllama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_PY = (sys.executable, os.path.join(ROOT, "run.py"))
ROOT_PASSWORD = "test-root-password"  # user root's password in every test proxy
CHAT = "llama3:latest"
EMBED = "nomic-embed-text:latest"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------- HTTP

GEN = {"model": "llama3", "prompt": "hi"}


async def fetch_stream(url: str, body: dict | bytes, **kwargs):
    """POST and collect (arrival time, chunk) per network chunk received."""
    arrivals: list[tuple[float, bytes]] = []
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    client = AsyncHTTPClient(force_instance=True)
    try:
        response = await client.fetch(HTTPRequest(
            url, method="POST", body=payload, request_timeout=60,
            streaming_callback=lambda c: arrivals.append((time.monotonic(), c)),
            **kwargs), raise_error=False)
    finally:
        client.close()
    return response, arrivals


async def raw_request(port: int, path: str, body: dict) -> object:
    """An HTTP/1.1 request on a bare TCP stream the test can cut at will."""
    payload = json.dumps(body).encode()
    stream = await TCPClient().connect("127.0.0.1", port)
    await stream.write(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n" % (path.encode(), len(payload)) + payload)
    return stream


async def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


@asynccontextmanager
async def running(models: tuple[str, ...] = (CHAT, EMBED), **options) -> AsyncIterator[
        tuple[FakeOllama, ollama.AsyncClient, openai.AsyncOpenAI]]:
    """A started node with an ollama and an openai client pointed at it."""
    node = await FakeOllama(list(models), **options).start()
    native = ollama.AsyncClient(host=node.url)
    compat = openai.AsyncOpenAI(base_url=node.url + "/v1", api_key="x", max_retries=0)
    try:
        yield node, native, compat
    finally:
        await native.close()
        await compat.close()
        await node.stop()


async def fetch(url: str, method: str = "GET", body: bytes | dict | None = None,
                chunks: list | None = None) -> HTTPResponse:
    """A raw request; with `chunks`, collects (arrival time, bytes) per network chunk."""
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    callback = (lambda c: chunks.append((time.monotonic(), c))) if chunks is not None else None
    client = AsyncHTTPClient(force_instance=True)
    try:
        return await client.fetch(HTTPRequest(
            url, method=method, body=body, allow_nonstandard_methods=True,
            streaming_callback=callback), raise_error=False)
    finally:
        client.close()


# ---------------------------------------------------------------- the management API

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


def overlap(records) -> int:
    """Most requests the node was serving at the same moment."""
    events = sorted([(r.started_at, 1) for r in records] +
                    [(r.finished_at or r.client_closed_at or time.monotonic(), -1)
                     for r in records])
    most = current = 0
    for _, delta in events:
        current += delta
        most = max(most, current)
    return most


def configure(proxy: Any, fake: Any, **fields: Any) -> None:
    """Change a node's stored settings the way the management API does."""
    from aivonx.store import Node
    proxy.ctx.nodes.update(Node.get(Node.port == fake.port).id, fields, partial=True)


async def admin_client(proxy: Any) -> ollama.AsyncClient:
    """An ollama client with an admin access token, for model operations."""
    return ollama.AsyncClient(host=proxy.url,
                              headers={"Authorization": f"Bearer {await login(proxy)}"})


class Answer:
    def __init__(self, response: HTTPResponse) -> None:
        self.response = response
        self.code = response.code
        self.headers = response.headers
        self.text = response.body.decode() if response.body else ""

    @property
    def json(self) -> Any:
        def no_constants(name: str) -> Any:
            raise ValueError(f"not strict JSON: {name}")
        return json.loads(self.text, parse_constant=no_constants)

    @property
    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.text.splitlines()]

    def __repr__(self) -> str:
        return f"<Answer {self.code} {self.text[:300]}>"


async def call(proxy: Any, method: str, path: str, body: Any = None, token: str | None = None,
               raw: bytes | None = None, headers: dict[str, str] | None = None) -> Answer:
    all_headers = dict(headers or {})
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    if data is not None:
        all_headers.setdefault("Content-Type", "application/json")
    if data is None and method in ("POST", "PUT", "PATCH"):
        data = b""
    response = await AsyncHTTPClient().fetch(
        proxy.url + path, method=method, body=data, headers=all_headers, raise_error=False,
        allow_nonstandard_methods=True, request_timeout=30, follow_redirects=False)
    return Answer(response)


async def login(proxy: Any, username: str = "root", password: str = ROOT_PASSWORD) -> str:
    answer = await call(proxy, "POST", "/api/account/login",
                        {"username": username, "password": password})
    assert answer.code == 200, answer
    return answer.json["access"]


# ---------------------------------------------------------------- processes

class NodeProcess:
    """A fake Ollama node in a process of its own."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.fakes.fake_ollama", "--port", "0", *args],
            cwd=ROOT, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert line.startswith("listening on "), line
        self.url = line.split()[-1]
        self.port = int(self.url.rsplit(":", 1)[1])

    def stop(self) -> None:
        """SIGSTOP: the node hangs with its sockets open, as a frozen machine."""
        self.proc.send_signal(signal.SIGSTOP)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


class AivonxProcess:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.url = ""
        self._new_line = asyncio.Event()
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line.decode(errors="replace"))
            self._new_line.set()
        self._new_line.set()

    async def wait_for(self, pattern: str, timeout: float = 20, start: int = 0) -> re.Match:
        """The first log line from index `start` on matching `pattern`."""
        async def scan() -> re.Match:
            seen = start
            while True:
                for line in self.lines[seen:]:
                    match = re.search(pattern, line)
                    if match:
                        return match
                seen = max(seen, len(self.lines))
                if self._reader.done():
                    raise AssertionError(f"exited before logging {pattern!r}:\n" + self.output)
                self._new_line.clear()
                await self._new_line.wait()
        return await asyncio.wait_for(scan(), timeout)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    async def stop(self) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(self.proc.wait(), 20)
        await self._reader
        return code


async def start_aivonx(*args: str, command: tuple[str, ...] = RUN_PY, env: dict | None = None,
                       cwd: str = ROOT) -> AivonxProcess:
    """Start Aivonx on a free port and wait until it listens."""
    proc = await asyncio.create_subprocess_exec(
        *command, "--port", "0", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=cwd)
    process = AivonxProcess(proc)
    try:
        process.url = (await process.wait_for(r"listening on (http://\S+)")).group(1)
    except BaseException:
        await process.stop()
        raise
    return process


async def run_to_end(*args: str, command: tuple[str, ...] = RUN_PY, env: dict | None = None,
                     cwd: str = ROOT, timeout: float = 30) -> tuple[int, str]:
    """Run a command that exits by itself: (exit code, stdout and stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *command, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, **(env or {})}, cwd=cwd)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, out.decode(errors="replace")


class Browser:
    """Just enough of a browser: a cookie jar, no redirects followed."""

    def __init__(self, proxy: Any) -> None:
        self.proxy = proxy
        self.cookies: dict[str, str] = {}
        self.set_cookies: dict[str, str] = {}  # raw Set-Cookie of the last answer, by name

    async def request(self, method: str, path: str, fields: dict[str, str] | None = None,
                      accept: str = "text/html", **headers: str) -> HTTPResponse:
        jar = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        all_headers = {"Accept": accept, **headers, **({"Cookie": jar} if jar else {})}
        body = None
        if method == "POST":
            body = urlencode(fields or {})
            all_headers["Content-Type"] = "application/x-www-form-urlencoded"
        client = AsyncHTTPClient(force_instance=True)
        try:
            response = await client.fetch(HTTPRequest(
                self.proxy.url + path, method=method, body=body, headers=all_headers,
                follow_redirects=False, request_timeout=30), raise_error=False)
        finally:
            client.close()
        self.set_cookies = {}
        for raw in response.headers.get_list("Set-Cookie"):
            cookie = SimpleCookie(raw)
            for name, morsel in cookie.items():
                self.set_cookies[name] = raw
                if not morsel.value:  # cleared
                    self.cookies.pop(name, None)
                else:
                    self.cookies[name] = morsel.value
        return response

    async def page(self, path: str = "/ui") -> str:
        response = await self.request("GET", path)
        assert response.code == 200, response.code
        return response.body.decode()

    async def xsrf(self, path: str = "/ui") -> str:
        """A form token, as a page carries it (signed out, /ui has no form)."""
        match = re.search(r'name="_xsrf" value="([^"]+)"', await self.page(path))
        if match is None:
            return await self.xsrf("/ui/login")
        return match.group(1)

    async def post(self, path: str, fields: dict[str, str], accept: str = "text/html",
                   **headers: str) -> HTTPResponse:
        fields = {"_xsrf": await self.xsrf(), **fields}
        return await self.request("POST", path, fields, accept, **headers)

    async def sign_in(self, password: str = ROOT_PASSWORD) -> HTTPResponse:
        token = await self.xsrf("/ui/login")
        return await self.request("POST", "/ui/login", {
            "_xsrf": token, "username": "root", "password": password})
