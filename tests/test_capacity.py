"""Node slots, the wait queue, warm-first and weighted routing, resting
nodes, the circuit breaker, and what clients are told."""
from __future__ import annotations

import asyncio
import json
import time

import ollama
import pytest
from tornado.httpclient import AsyncHTTPClient

from tests.helpers import GEN, configure, fetch_stream, overlap, raw_request, wait_for


async def test_requests_beyond_the_slots_wait_in_fifo_order(io_loop, make_node, make_proxy):
    node = await make_node(chunks=3, chunk_delay=0.1)
    proxy = await make_proxy([node])
    configure(proxy, node, slots=1)
    client = ollama.AsyncClient(host=proxy.url)
    prompts = [f"p{i}" for i in range(4)]

    async def one(prompt: str, delay: float):
        await asyncio.sleep(delay)
        return await client.generate(model="llama3", prompt=prompt, stream=False)

    results = await asyncio.gather(*(one(p, i * 0.02) for i, p in enumerate(prompts)))
    assert all(r.done for r in results)
    records = node.requests_to("/api/generate")
    assert overlap(records) == 1
    assert [r.json["prompt"] for r in records] == prompts  # first come, first served
    assert proxy.ctx.scheduler.queued_total == 3 and proxy.ctx.scheduler.depth == 0


async def test_full_queue_answers_503_with_retry_after(io_loop, make_node, make_proxy):
    node = await make_node(chunks=5, chunk_delay=0.1)
    proxy = await make_proxy([node], max_queue=1)
    configure(proxy, node, slots=1)
    first = asyncio.ensure_future(fetch_stream(proxy.url + "/api/generate", GEN))
    await wait_for(lambda: proxy.node(node).active_requests == 1)
    second = asyncio.ensure_future(fetch_stream(proxy.url + "/api/generate", GEN))
    await wait_for(lambda: proxy.ctx.scheduler.depth == 1)
    state = json.loads((await AsyncHTTPClient().fetch(proxy.url + "/api/proxy/state")).body)
    assert state["queue"]["depth"] == 1 and state["queue"]["limit"] == 1
    assert state["queue"]["oldest_wait"] >= 0
    assert state["nodes"][0]["slots"] == 1 and state["nodes"][0]["active_requests"] == 1
    response, arrivals = await fetch_stream(proxy.url + "/api/generate", GEN)
    assert response.code == 503 and response.headers["Retry-After"]
    assert "server busy" in json.loads(b"".join(c for _, c in arrivals))["error"]
    assert (await first)[0].code == 200 and (await second)[0].code == 200
    assert proxy.ctx.scheduler.max_depth_seen == 1


async def test_wait_past_the_limit_answers_503(io_loop, make_node, make_proxy):
    node = await make_node(chunks=10, chunk_delay=0.1)
    proxy = await make_proxy([node], max_wait=0.3)
    configure(proxy, node, slots=1)
    busy = asyncio.ensure_future(fetch_stream(proxy.url + "/api/generate", GEN))
    await wait_for(lambda: proxy.node(node).active_requests == 1)
    started = time.monotonic()
    client = ollama.AsyncClient(host=proxy.url)
    with pytest.raises(ollama.ResponseError) as err:
        await client.generate(model="llama3", prompt="x", stream=False)
    assert err.value.status_code == 503 and 0.25 < time.monotonic() - started < 2
    assert (await busy)[0].code == 200


async def test_a_client_leaving_the_queue_gives_its_place_up(io_loop, make_node, make_proxy):
    node = await make_node(chunks=4, chunk_delay=0.1)
    proxy = await make_proxy([node])
    configure(proxy, node, slots=1)
    busy = asyncio.ensure_future(fetch_stream(proxy.url + "/api/generate", GEN))
    await wait_for(lambda: proxy.node(node).active_requests == 1)
    leaver = await raw_request(proxy.port, "/api/generate", GEN)
    await wait_for(lambda: proxy.ctx.scheduler.depth == 1)
    leaver.close()
    await wait_for(lambda: proxy.ctx.scheduler.depth == 0)
    assert (await busy)[0].code == 200
    await wait_for(lambda: proxy.node(node).active_requests == 0)
    # The slot was not leaked: the next request is served at once.
    response, _ = await fetch_stream(proxy.url + "/api/generate", GEN)
    assert response.code == 200 and len(node.requests_to("/api/generate")) == 2


async def test_warm_first_prefers_the_node_holding_the_model(io_loop, make_node, make_proxy):
    cold = await make_node()
    warm = await make_node()
    warm.loaded = ["llama3:latest"]
    proxy = await make_proxy([cold, warm])
    proxy.ctx.router.strategy = "warm_first"
    client = ollama.AsyncClient(host=proxy.url)
    for _ in range(5):
        await client.generate(model="llama3", prompt="x", stream=False)
    assert len(warm.requests_to("/api/generate")) == 5 and not cold.requests_to("/api/generate")


async def test_round_robin_follows_weights(io_loop, make_node, make_proxy):
    small = await make_node()
    big = await make_node()
    proxy = await make_proxy([small, big])
    configure(proxy, big, weight=3.0)
    proxy.ctx.router.strategy = "round_robin"
    client = ollama.AsyncClient(host=proxy.url)
    for _ in range(8):
        await client.generate(model="llama3", prompt="x", stream=False)
    assert (len(small.requests_to("/api/generate")), len(big.requests_to("/api/generate"))) == (2, 6)


async def test_a_busy_node_rests_instead_of_being_hammered(io_loop, make_node, make_proxy):
    busy = await make_node()
    calm = await make_node()
    proxy = await make_proxy([busy, calm], health_interval=3600)
    busy.fail_status, busy.fail_message = 503, "server busy, please try again."
    client = ollama.AsyncClient(host=proxy.url)
    for _ in range(6):
        assert (await client.generate(model="llama3", prompt="x", stream=False)).done
    assert len(busy.requests_to("/api/generate")) == 1  # then it rests
    state = json.loads((await AsyncHTTPClient().fetch(proxy.url + "/api/proxy/state")).body)
    view = next(n for n in state["nodes"] if n["port"] == busy.port)
    assert (view["health"], view["status"]) == ("degraded", "standby")
    assert view["reason"].startswith("busy") and view["since"] > 0
    assert len(calm.requests_to("/api/generate")) == 6


async def test_circuit_opens_on_a_flapping_node(io_loop, make_node, make_proxy):
    flappy = await make_node()
    steady = await make_node(chunks=4, chunk_delay=0.05)
    proxy = await make_proxy([flappy, steady], health_interval=0.2)
    configure(proxy, steady, slots=2)
    flappy.die_after = 0  # probes pass, every request is cut before a byte
    client = ollama.AsyncClient(host=proxy.url)
    state = proxy.node(flappy)

    async def worker(until) -> None:
        while not until():
            assert (await client.generate(model="llama3", prompt="x", stream=False)).done
            await asyncio.sleep(0.05)

    # Whenever the steady node is full, the monitor has brought the flappy
    # one back: without a breaker it would eat a request every time. Three
    # failure incidents at least a second apart open the circuit.
    started = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(
        worker(lambda: "circuit open" in state.reason) for _ in range(4))), 10)
    assert time.monotonic() - started < 5
    eaten = len(flappy.requests_to("/api/generate"))
    stop_at = time.monotonic() + 1.5
    await asyncio.gather(*(worker(lambda: time.monotonic() > stop_at) for _ in range(4)))
    assert len(flappy.requests_to("/api/generate")) == eaten  # it stopped eating
    assert state.healthy and state.status == "standby" and "circuit open" in state.reason
    assert state.health == "degraded"


async def test_resting_nodes_serve_when_no_other_node_can(io_loop, make_node, make_proxy):
    resting = await make_node()
    proxy = await make_proxy([resting], health_interval=3600)
    state = proxy.node(resting)
    state.breaker.until = time.monotonic() + 60  # its circuit is open
    assert state.healthy and state.status == "standby"
    # It answers probes and nothing else has the model: trying it beats
    # refusing the client.
    client = ollama.AsyncClient(host=proxy.url)
    assert (await client.generate(model="llama3", prompt="x", stream=False)).done


async def test_metrics_and_response_headers(io_loop, make_node, make_proxy):
    node = await make_node()
    proxy = await make_proxy([node])
    response, _ = await fetch_stream(proxy.url + "/api/generate", {**GEN, "stream": False})
    assert response.headers["X-Aivonx-Node"] == proxy.node(node).name
    assert float(response.headers["X-Aivonx-Overhead-Ms"]) >= 0
    await fetch_stream(proxy.url + "/api/generate", GEN)
    metrics = await AsyncHTTPClient().fetch(proxy.url + "/metrics")
    assert metrics.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = metrics.body.decode()
    name = proxy.node(node).name
    assert f'aivonx_requests_total{{node="{name}",model="llama3:latest",code="200"}} 2' in text
    assert f'aivonx_time_to_first_chunk_seconds_count{{node="{name}",model="llama3:latest"}} 2' \
        in text
    assert f'aivonx_node_health{{node="{name}",state="healthy"}} 1' in text
    assert "aivonx_queue_depth 0" in text and "aivonx_proxy_overhead_seconds_bucket" in text
