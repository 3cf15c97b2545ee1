"""Kept-alive upstream connections: reused, a stale one costs nothing, idle
ones closed on a timer and when their node goes."""
from __future__ import annotations

import socket
import time

import ollama
import pytest
from tornado.iostream import IOStream

from aivonx.relay.upstream import ConnectionPool, pool_key
from tests.helpers import call, login
from tests.helpers import GEN, fetch_stream, wait_for


def idle(proxy, fake) -> list:
    return proxy.ctx.relay.client.pool.idle.get(("http", "127.0.0.1", fake.port), [])


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
    proxy.ctx.relay.client.pool.idle[("http", "127.0.0.1", node.port)] = [(time.monotonic(), stale)]
    response, arrivals = await fetch_stream(proxy.url + "/api/generate", {**GEN, "stream": False})
    assert response.code == 200 and stale.closed()
    assert proxy.node(node).status == "active" and proxy.node(node).errors == 0


async def test_cancelling_a_request_never_returns_its_connection(io_loop, make_node,
                                                                 make_proxy):
    from tests.helpers import raw_request, wait_for
    node = await make_node(chunks=50, chunk_delay=0.05)
    proxy = await make_proxy([node])
    conn = await raw_request(proxy.port, "/api/generate", GEN)
    await wait_for(lambda: node.requests_to("/api/generate")
                   and node.requests_to("/api/generate")[0].chunks_sent >= 2)
    conn.close()
    record = node.requests_to("/api/generate")[0]
    await wait_for(lambda: record.client_closed_at is not None)
    assert idle(proxy, node) == []


# -- the pool: keys, the purge timer, closing one node's connections -------------

def _stream_pair() -> tuple[IOStream, socket.socket]:
    ours, theirs = socket.socketpair()
    return IOStream(ours), theirs


def test_the_pool_key_tells_http_from_https():
    assert pool_key("http://GPU1:11434/api/generate") == ("http", "gpu1", 11434)
    assert pool_key("https://gpu1:11434") == ("https", "gpu1", 11434)
    assert pool_key("https://gpu1") == ("https", "gpu1", 443)
    assert pool_key("http://[::1]:8080") == ("http", "::1", 8080)


async def test_http_and_https_to_one_host_and_port_never_share_a_socket(io_loop):
    pool = ConnectionPool()
    stream, theirs = _stream_pair()
    pool.put(pool_key("https://127.0.0.1:9999"), stream)
    assert pool.take(pool_key("http://127.0.0.1:9999")) is None
    assert pool.take(pool_key("https://127.0.0.1:9999")) is stream
    pool.close()
    stream.close()
    theirs.close()


async def test_idle_connections_are_closed_by_a_timer_without_traffic(io_loop):
    pool = ConnectionPool(max_idle=0.05, purge_interval=0.02)
    stream, theirs = _stream_pair()
    pool.put(("http", "127.0.0.1", 1), stream)
    await wait_for(stream.closed)
    assert pool.idle == {}
    theirs.close()
    pool.close()


async def test_a_connection_holding_unread_bytes_is_not_taken(io_loop):
    pool = ConnectionPool()
    stream, theirs = _stream_pair()
    pool.put(("http", "127.0.0.1", 1), stream)
    theirs.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert pool.take(("http", "127.0.0.1", 1)) is None
    assert stream.closed()
    theirs.close()
    pool.close()


async def test_connections_idle_too_long_are_closed_towards_the_node(io_loop, make_node,
                                                                     make_proxy):
    node = await make_node()
    proxy = await make_proxy([node], health_interval=3600)
    pool = proxy.ctx.relay.client.pool
    pool.max_idle, pool.purge_interval = 0.1, 0.05
    await ollama.AsyncClient(host=proxy.url).generate(model="llama3", prompt="x", stream=False)
    assert len(idle(proxy, node)) == 1
    await wait_for(lambda: node.connections_open == 0)  # no request came to purge it


async def _kept_connection(proxy, node) -> None:
    await ollama.AsyncClient(host=proxy.url).generate(model="llama3", prompt="x", stream=False)
    await wait_for(lambda: node.connections_open == 1 and len(idle(proxy, node)) == 1)


@pytest.mark.parametrize("change", ["delete", "drain", "move"])
async def test_a_deleted_drained_or_moved_node_sees_its_idle_connections_closed(
        io_loop, make_node, make_proxy, change):
    node, other = await make_node(), await make_node()
    proxy = await make_proxy([node], health_interval=3600)
    await _kept_connection(proxy, node)
    token = await login(proxy)
    url = f"/api/proxy/nodes/{proxy.node(node).id}"
    if change == "delete":
        answer = await call(proxy, "DELETE", url, token=token)
    elif change == "drain":
        answer = await call(proxy, "PATCH", url, {"active": False}, token=token)
    else:
        answer = await call(proxy, "PATCH", url, {"port": other.port}, token=token)
    assert answer.code in (200, 204), answer
    await wait_for(lambda: node.connections_open == 0)
    assert idle(proxy, node) == []


async def test_renaming_a_node_keeps_its_connections(io_loop, make_node, make_proxy):
    node = await make_node()
    proxy = await make_proxy([node], health_interval=3600)
    await _kept_connection(proxy, node)
    token = await login(proxy)
    answer = await call(proxy, "PATCH", f"/api/proxy/nodes/{proxy.node(node).id}",
                        {"name": "renamed"}, token=token)
    assert answer.code == 200, answer
    accepted = node.connections_accepted
    await ollama.AsyncClient(host=proxy.url).generate(model="llama3", prompt="x", stream=False)
    assert node.connections_accepted == accepted  # the kept connection served it
