"""Hostile and broken clients get a quick 4xx, and everyone else keeps
being served meanwhile."""
from __future__ import annotations

import asyncio
import json
import time

from hypothesis import HealthCheck, given, settings, strategies as st
from tornado.httpclient import AsyncHTTPClient
from tornado.iostream import StreamClosedError
from tornado.tcpclient import TCPClient

from tests.helpers import call


async def read_status(stream) -> bytes:
    try:
        return await asyncio.wait_for(stream.read_until(b"\r\n"), 5)
    except StreamClosedError:
        return b""


async def test_oversized_head_and_body_are_refused(io_loop, make_node, make_proxy):
    proxy = await make_proxy([await make_node()], max_body_size=1024 * 1024)
    stream = await TCPClient().connect("127.0.0.1", proxy.port)
    await stream.write(b"GET /api/tags HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 +
                       b"\r\n\r\n")
    # Tornado drops a connection whose head exceeds the limit without a
    # word; what matters is that it is refused at once, not read on.
    assert await read_status(stream) == b""
    stream.close()
    stream = await TCPClient().connect("127.0.0.1", proxy.port)
    await stream.write(b"POST /api/generate HTTP/1.1\r\nHost: x\r\n"
                       b"Content-Length: 5000000\r\n\r\n")
    assert (await read_status(stream)).startswith(b"HTTP/1.1 4")
    stream.close()


async def test_slow_senders_are_cut_off_and_others_are_served(io_loop, make_node, make_proxy):
    proxy = await make_proxy([await make_node()], header_timeout=1.0)
    slow = []
    for _ in range(50):
        stream = await TCPClient().connect("127.0.0.1", proxy.port)
        await stream.write(b"GET /api/tags HTTP/1.1\r\nHost: x\r\n")  # never finishes
        slow.append(stream)
    started = time.monotonic()
    response = await AsyncHTTPClient().fetch(proxy.url + "/api/version")
    assert response.code == 200 and time.monotonic() - started < 0.5
    await asyncio.sleep(1.5)
    for stream in slow:
        assert stream.closed() or await read_status(stream) == b""
        stream.close()


async def test_path_tricks_do_not_escape_the_routes(io_loop, make_node, make_proxy):
    node = await make_node()
    proxy = await make_proxy([node])
    for path in ["/api/../api/tags", "/%2e%2e/%2e%2e/etc/passwd", "//api/tags",
                 "/v1/models/..%2f..%2fetc%2fpasswd", "/api/generate%00", "/api/tags/x"]:
        response = await call(proxy, "GET", path)
        assert 400 <= response.code < 500, path
    assert all(r.path in ("/", "/api/tags", "/api/ps", "/api/version") for r in node.requests)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                 max_size=4),
    max_leaves=20)
BODIES = st.one_of(
    st.dictionaries(st.sampled_from(["model", "prompt", "messages", "input", "stream",
                                     "options", "keep_alive", "images", "format"]),
                    JSON, max_size=6),
    JSON.map(lambda v: v if not isinstance(v, dict) else {"x": v}),
    st.binary(max_size=64).map(lambda b: b),
)


def test_fuzzed_inference_bodies_never_get_a_5xx(make_node, make_proxy, io_loop):
    """Random bodies for every inference endpoint: 2xx or 4xx, JSON errors."""

    async def setup():
        node = await make_node(["llama3:latest", "emb:latest"])
        return await make_proxy([node], health_interval=3600)

    proxy = io_loop.run_sync(setup)
    paths = ["/api/generate", "/api/chat", "/api/embed", "/api/embeddings", "/api/show",
             "/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
    deadline = time.monotonic() + 25

    @settings(max_examples=150, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(path=st.sampled_from(paths), body=BODIES,
           model=st.sampled_from(["llama3", "emb", "LLAMA3:latest", "", "x" * 300, None]))
    def check(path, body, model):
        if time.monotonic() > deadline:
            return
        if isinstance(body, dict) and model is not None:
            body = {**body, "model": model}
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = io_loop.run_sync(lambda: call(proxy, "POST", path, raw=payload))
        assert response.code < 500, (path, payload, response.code, response.text)
        if response.code >= 400:
            assert "error" in response.json

    check()
