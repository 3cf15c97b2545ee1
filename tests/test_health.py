"""Nodes leaving and rejoining the pool, and what that costs clients."""
from __future__ import annotations

import asyncio
import socket
import time

import ollama
import pytest

from tests.helpers import wait_for


async def test_dead_node_leaves_within_one_interval_and_returns_with_models(
        io_loop, make_node, make_proxy):
    a = await make_node(["llama3:latest"])
    b = await make_node(["llama3:latest"])
    proxy = await make_proxy([a, b], health_interval=0.5)
    assert proxy.node(a).status == proxy.node(b).status == "active"
    port = b.port
    await b.stop()
    died = time.monotonic()
    await wait_for(lambda: proxy.node(b).status == "standby", timeout=3)
    assert time.monotonic() - died < 0.5 + 1.0 + 0.3  # one interval plus a probe timeout
    b.models = ["llama3:latest", "qwen3:8b"]  # it comes back with a new model
    await b.start(port=port)
    back = time.monotonic()
    await wait_for(lambda: proxy.node(b).status == "active", timeout=3)
    assert time.monotonic() - back < 0.5 + 0.3
    # Routable at once, with the model list of the same probe.
    client = ollama.AsyncClient(host=proxy.url)
    assert (await client.generate(model="qwen3:8b", prompt="x", stream=False)).done


async def test_one_hanging_node_never_delays_the_probes_of_the_others(io_loop, make_node,
                                                                       make_proxy, tmp_path):
    fine = await make_node()
    # A node that accepts connections and never answers.
    hanging = socket.socket()
    hanging.bind(("127.0.0.1", 0))
    hanging.listen(16)
    try:
        proxy = await make_proxy([fine], health_interval=3600, probe_timeout=1.0)
        proxy.ctx.nodes.create({"name": "hanging", "address": "127.0.0.1",
                                "port": hanging.getsockname()[1]})
        started = time.monotonic()
        await proxy.probe()
        assert time.monotonic() - started < 1.5
        states = {n.name: n.status for n in proxy.registry.nodes.values()}
        assert states["hanging"] == "standby"
        assert proxy.node(fine).status == "active"
    finally:
        hanging.close()


async def test_killing_a_node_under_load_loses_no_request_not_yet_streaming(
        io_loop, make_node, make_proxy):
    a = await make_node(chunks=3, chunk_delay=0.02)
    b = await make_node(chunks=3, chunk_delay=0.02)
    proxy = await make_proxy([a, b], health_interval=0.5)
    client = ollama.AsyncClient(host=proxy.url)
    results: list[object] = []

    async def worker() -> None:
        for _ in range(15):
            try:
                results.append(await client.generate(model="llama3", prompt="x", stream=False))
            except ollama.ResponseError as exc:
                results.append(exc)
            await asyncio.sleep(0.01)

    async def killer() -> None:
        await asyncio.sleep(0.2)
        await a.stop()

    await asyncio.gather(*(worker() for _ in range(6)), killer())
    failures = [r for r in results if isinstance(r, Exception)]
    started_on_a = [r for r in a.requests if r.path == "/api/generate" and r.chunks_sent]
    # Only requests the dead node had already begun answering may fail.
    assert len(failures) <= len(started_on_a)
    assert len(results) == 90 and proxy.node(a).status == "standby"


async def test_a_model_only_on_down_nodes_is_503_not_404(io_loop, make_node, make_proxy):
    a = await make_node(["llama3:latest", "rare:latest"])
    b = await make_node(["llama3:latest"])
    proxy = await make_proxy([a, b], health_interval=3600)
    await a.stop()
    await proxy.probe()
    client = ollama.AsyncClient(host=proxy.url)
    for model, status in [("rare", 503), ("never-seen", 404)]:
        with pytest.raises(ollama.ResponseError) as err:
            await client.generate(model=model, prompt="x", stream=False)
        assert err.value.status_code == status


async def test_least_active_spreads_and_ties_rotate(io_loop, make_node, make_proxy):
    nodes = [await make_node() for _ in range(3)]
    proxy = await make_proxy(nodes)
    client = ollama.AsyncClient(host=proxy.url)
    for _ in range(9):
        await client.generate(model="llama3", prompt="x", stream=False)
    assert [len(n.requests_to("/api/generate")) for n in nodes] == [3, 3, 3]
    # Concurrent slow requests go to the least busy nodes.
    for n in nodes:
        n.chunk_delay = 0.05
    await asyncio.gather(*(client.generate(model="llama3", prompt="x", stream=False)
                           for _ in range(6)))
    assert [len(n.requests_to("/api/generate")) for n in nodes] == [5, 5, 5]
