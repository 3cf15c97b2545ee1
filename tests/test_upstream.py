"""Kept-alive upstream connections: reused, and a stale one costs nothing."""
from __future__ import annotations

import socket
import time

import ollama
from tornado.iostream import IOStream

from tests.test_relay import GEN, fetch_stream


def idle(proxy, fake) -> list:
    return proxy.ctx.relay.client.pool.idle.get(("127.0.0.1", fake.port), [])


async def test_connections_to_a_node_are_reused(io_loop, make_node, make_proxy):
    node = await make_node()
    proxy = await make_proxy([node])
    client = ollama.AsyncClient(host=proxy.url)
    await client.generate(model="llama3", prompt="x", stream=False)
    first = [s for _, s in idle(proxy, node)]
    assert len(first) == 1
    for _ in range(5):
        await client.generate(model="llama3", prompt="x", stream=False)
        parts = [p async for p in await client.generate(model="llama3", prompt="x",
                                                        stream=True)]
        assert parts[-1].done
    assert [s for _, s in idle(proxy, node)] == first  # the very same connection


async def test_a_connection_the_node_closed_meanwhile_is_retried_quietly(
        io_loop, make_node, make_proxy):
    node = await make_node()
    proxy = await make_proxy([node], health_interval=3600)
    # A kept-alive connection whose far end is already gone, and the proxy
    # has not noticed yet.
    ours, theirs = socket.socketpair()
    theirs.close()
    stale = IOStream(ours)
    proxy.ctx.relay.client.pool.idle[("127.0.0.1", node.port)] = [(time.monotonic(), stale)]
    response, arrivals = await fetch_stream(proxy.url + "/api/generate", {**GEN, "stream": False})
    assert response.code == 200 and stale.closed()
    assert proxy.node(node).status == "active" and proxy.node(node).errors == 0


async def test_cancelling_a_request_never_returns_its_connection(io_loop, make_node,
                                                                 make_proxy):
    from tests.test_relay import raw_request, wait_for
    node = await make_node(chunks=50, chunk_delay=0.05)
    proxy = await make_proxy([node])
    conn = await raw_request(proxy.port, "/api/generate", GEN)
    await wait_for(lambda: node.requests_to("/api/generate")
                   and node.requests_to("/api/generate")[0].chunks_sent >= 2)
    conn.close()
    record = node.requests_to("/api/generate")[0]
    await wait_for(lambda: record.client_closed_at is not None)
    assert idle(proxy, node) == []
