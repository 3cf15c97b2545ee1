"""The relay rules, each one a behaviour a user sees."""
from __future__ import annotations

import asyncio
import base64
import json
import time

import ollama
import openai
import pytest

from tests.helpers import GEN, fetch_stream, raw_request, wait_for

async def test_chunks_are_forwarded_one_by_one_as_they_arrive(io_loop, make_node, make_proxy):
    node = await make_node(chunks=6, chunk_delay=0.15)
    proxy = await make_proxy([node])
    response, arrivals = await fetch_stream(proxy.url + "/api/generate", GEN)
    assert response.code == 200
    assert response.headers["Content-Type"] == "application/x-ndjson"
    # Seven lines (six tokens and the final one), each in its own chunk...
    assert [c.count(b"\n") for _, c in arrivals] == [1] * 7
    # ...arriving paced as the node produced them, not all at the end.
    gaps = [b[0] - a[0] for a, b in zip(arrivals, arrivals[1:])]
    assert min(gaps[:5]) > 0.08
    assert arrivals[-1][0] - arrivals[0][0] > 0.6


async def test_stream_defaults_to_true_when_absent(io_loop, make_node, make_proxy):
    proxy = await make_proxy([await make_node()])
    response, arrivals = await fetch_stream(proxy.url + "/api/chat", {
        "model": "llama3", "messages": [{"role": "user", "content": "x"}]})
    assert response.headers["Content-Type"] == "application/x-ndjson"
    lines = b"".join(c for _, c in arrivals).splitlines()
    assert len(lines) == 6 and json.loads(lines[-1])["done"] is True
    response, _ = await fetch_stream(proxy.url + "/api/chat", {
        "model": "llama3", "messages": [], "stream": False})
    assert response.headers["Content-Type"].startswith("application/json")


async def test_upstream_status_and_body_pass_through(io_loop, make_node, make_proxy):
    node = await make_node()
    proxy = await make_proxy([node])
    node.fail_status, node.fail_message = 400, "raw mode does not support template"
    response, arrivals = await fetch_stream(proxy.url + "/api/generate", GEN)
    assert response.code == 400
    assert response.headers["Content-Type"].startswith("application/json")
    assert json.loads(b"".join(c for _, c in arrivals)) == {
        "error": "raw mode does not support template"}
    node.fail_status = 500
    response, arrivals = await fetch_stream(proxy.url + "/api/generate", GEN)
    assert response.code == 500  # the only node's own answer, untouched
    assert json.loads(b"".join(c for _, c in arrivals)) == {"error": "raw mode does not support template"}


async def test_failover_before_first_byte_on_5xx(io_loop, make_node, make_proxy):
    bad = await make_node()
    good = await make_node()
    proxy = await make_proxy([bad, good])
    bad.fail_status = 503
    client = ollama.AsyncClient(host=proxy.url)
    for _ in range(6):
        result = await client.generate(model="llama3", prompt="x", stream=False)
        assert result.done
    assert len(good.requests_to("/api/generate")) == 6
    assert bad.requests_to("/api/generate")  # it was tried, and skipped


async def test_dead_node_is_demoted_by_the_request_that_found_it(io_loop, make_node, make_proxy):
    dead = await make_node()
    alive = await make_node()
    proxy = await make_proxy([dead, alive], health_interval=3600)
    await dead.stop()
    client = ollama.AsyncClient(host=proxy.url)
    for _ in range(4):
        assert (await client.generate(model="llama3", prompt="x", stream=False)).done
    assert proxy.node(dead).status == "standby"
    assert proxy.node(alive).status == "active"
    assert len(alive.requests_to("/api/generate")) == 4


async def test_mid_stream_failure_ends_with_an_error_line(io_loop, make_node, make_proxy):
    node = await make_node(chunks=10)
    proxy = await make_proxy([node])
    node.die_after = 3
    response, arrivals = await fetch_stream(proxy.url + "/api/generate", GEN)
    lines = b"".join(c for _, c in arrivals).splitlines()
    assert response.code == 200 and len(lines) == 4
    assert [json.loads(line)["response"] for line in lines[:3]] == ["tok0 ", "tok1 ", "tok2 "]
    assert "failed mid-response" in json.loads(lines[3])["error"]
    # The real client raises rather than ending silently.
    client = ollama.AsyncClient(host=proxy.url)
    with pytest.raises(ollama.ResponseError):
        async for _ in await client.generate(model="llama3", prompt="x", stream=True):
            pass


async def test_mid_stream_failure_on_sse_is_an_error_event(io_loop, make_node, make_proxy):
    node = await make_node(chunks=10)
    proxy = await make_proxy([node])
    node.die_after = 3
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0)
    stream = await client.chat.completions.create(
        model="llama3", messages=[{"role": "user", "content": "x"}], stream=True)
    with pytest.raises(openai.APIError):
        async for _ in stream:
            pass


@pytest.mark.parametrize("stream", [True, False])
async def test_client_disconnect_mid_generation_closes_upstream(io_loop, make_node, make_proxy,
                                                                stream):
    node = await make_node(chunks=200, chunk_delay=0.05)
    proxy = await make_proxy([node])
    conn = await raw_request(proxy.port, "/api/generate", {**GEN, "stream": stream})
    await wait_for(lambda: node.requests_to("/api/generate")
                   and node.requests_to("/api/generate")[0].chunks_sent >= 3)
    if stream:
        assert b"tok0" in await conn.read_bytes(4096, partial=True)
    left_at = time.monotonic()
    conn.close()
    record = node.requests_to("/api/generate")[0]
    await wait_for(lambda: record.client_closed_at is not None, timeout=2)
    assert record.client_closed_at - left_at < 0.1
    assert record.finished_at is None
    await wait_for(lambda: proxy.node(node).active_requests == 0)


@pytest.mark.parametrize("path,body", [
    ("/api/generate", {**GEN, "stream": True}),
    ("/api/generate", {**GEN, "stream": False}),
    ("/v1/chat/completions", {"model": "llama3", "messages": [{"role": "user", "content": "x"}]}),
])
async def test_client_disconnect_during_silent_model_load_closes_upstream(
        io_loop, make_node, make_proxy, path, body):
    node = await make_node(first_byte_delay=30)
    proxy = await make_proxy([node])
    conn = await raw_request(proxy.port, path, body)
    await wait_for(lambda: node.requests_to(path))
    await asyncio.sleep(0.2)
    left_at = time.monotonic()
    conn.close()
    record = node.requests_to(path)[0]
    await wait_for(lambda: record.client_closed_at is not None, timeout=2)
    assert record.client_closed_at - left_at < 0.1
    assert record.chunks_sent == 0


async def test_no_total_deadline_only_an_idle_timeout(io_loop, make_node, make_proxy):
    node = await make_node(chunks=8, chunk_delay=0.3)
    proxy = await make_proxy([node], idle_timeout=1.0)
    # 2.4 s in total, never 1 s without a byte: it completes.
    response, arrivals = await fetch_stream(proxy.url + "/api/generate", GEN)
    lines = b"".join(c for _, c in arrivals).splitlines()
    assert response.code == 200 and json.loads(lines[-1])["done"] is True
    # Silent for longer than the idle timeout: the relay gives up.
    node.first_byte_delay = 3
    response, arrivals = await fetch_stream(proxy.url + "/api/generate", GEN)
    assert response.code == 503
    assert "no data from node" in json.loads(b"".join(c for _, c in arrivals))["error"]


async def test_request_bodies_over_100_mb_pass(io_loop, make_node, make_proxy):
    node = await make_node()
    # The test node shares this process: keep its probes out of the upload.
    proxy = await make_proxy([node], health_interval=3600)
    image = base64.b64encode(b"\x89PNG" * (27 * 1024 * 1024)).decode()  # 144 MB of base64
    body = json.dumps({"model": "llama3", "prompt": "describe", "images": [image],
                       "stream": False}).encode()
    assert len(body) > 100 * 1024 * 1024
    response, arrivals = await fetch_stream(proxy.url + "/api/generate", body)
    assert response.code == 200 and json.loads(b"".join(c for _, c in arrivals))["done"]
    received = node.requests_to("/api/generate")[0]
    assert len(received.body) == len(body)
    del image, body


async def test_credentials_stay_with_the_proxy_and_host_is_the_nodes(io_loop, make_node,
                                                                      make_proxy):
    node = await make_node()
    proxy = await make_proxy([node])
    response, _ = await fetch_stream(proxy.url + "/api/generate", {**GEN, "stream": False},
                                     headers={"Authorization": "Bearer secret",
                                              "Cookie": "session=secret",
                                              "Host": "public.example.com",
                                              "User-Agent": "ollama-python/0.6.3"})
    assert response.code == 200
    seen = node.requests_to("/api/generate")[0].headers
    assert "authorization" not in seen and "cookie" not in seen
    assert seen["host"] == f"127.0.0.1:{node.port}"
    assert seen["user-agent"] == "ollama-python/0.6.3"
