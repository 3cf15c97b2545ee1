"""What a client may send: body size, bodies in memory, body pace, and that
a body does not outlive its request."""
from __future__ import annotations

import asyncio
import gc
import json
import tracemalloc

from tornado.iostream import StreamClosedError
from tornado.tcpclient import TCPClient

from tests.helpers import GEN, fetch_stream, wait_for


async def send_head(port: int, path: str, headers: dict[str, str], body: bytes = b""):
    stream = await TCPClient().connect("127.0.0.1", port)
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    await stream.write(f"POST {path} HTTP/1.1\r\nHost: x\r\n{head}\r\n".encode() + body)
    return stream


async def read_answer(stream, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(stream.read_until(b"\r\n\r\n"), timeout)
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    body = await asyncio.wait_for(stream.read_bytes(int(headers["Content-Length"])), timeout)
    return status, headers, body


async def test_an_oversized_login_is_refused_from_its_head(io_loop, make_proxy):
    proxy = await make_proxy()
    # 200 MB announced, none sent: the answer must not wait for the body.
    stream = await send_head(proxy.port, "/api/account/login",
                             {"Content-Type": "application/json",
                              "Content-Length": str(200 * 1024 * 1024)})
    status, headers, body = await read_answer(stream)
    assert status == 413 and "too large" in json.loads(body)["error"]
    stream.close()


async def test_a_chunked_body_is_cut_at_the_limit(io_loop, make_proxy):
    proxy = await make_proxy()
    stream = await send_head(proxy.port, "/api/proxy/nodes",
                             {"Content-Type": "application/json",
                              "Transfer-Encoding": "chunked"})
    chunk = b"x" * 65536
    status = None
    for _ in range(40):  # 2.5 MB, over the 1 MiB limit of management bodies
        try:
            await stream.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except StreamClosedError:
            break
    status, _, body = await read_answer(stream)
    assert status == 413 and "too large" in json.loads(body)["error"]


async def test_bodies_in_memory_are_bounded_and_given_back(io_loop, make_node, make_proxy):
    node = await make_node()
    proxy = await make_proxy([node], max_body_in_flight=1024 * 1024)
    payload = json.dumps({**GEN, "prompt": "x" * 700_000}).encode()
    # The first body is still arriving: it holds its share of the budget.
    slow = await send_head(proxy.port, "/api/generate",
                           {"Content-Length": str(len(payload))}, payload[:1000])
    await wait_for(lambda: proxy.ctx.body_budget.used == len(payload))
    second = await send_head(proxy.port, "/api/generate",
                             {"Content-Length": str(len(payload))}, payload)
    status, headers, body = await read_answer(second)
    assert status == 503 and headers["Retry-After"] == "2"
    assert "try again" in json.loads(body)["error"]
    await slow.write(payload[1000:])
    status, _, _ = await asyncio.wait_for(slow.read_until(b"\r\n"), 10), None, None
    slow.close()
    await wait_for(lambda: proxy.ctx.body_budget.used == 0)
    response, _ = await fetch_stream(proxy.url + "/api/generate", payload)
    assert response.code == 200


async def test_a_client_that_stops_sending_its_body_is_dropped(io_loop, make_node, make_proxy):
    proxy = await make_proxy([await make_node()], body_timeout=0.5, idle_timeout=600)
    stream = await send_head(proxy.port, "/api/generate", {"Content-Length": "1000"},
                             b'{"model": "llama3", ')
    closed = asyncio.get_running_loop().create_future()
    stream.set_close_callback(lambda: closed.set_result(True))
    assert await asyncio.wait_for(closed, 10)
    await wait_for(lambda: proxy.ctx.body_budget.used == 0)


async def test_a_relayed_body_is_freed_with_its_request(io_loop, node_process, make_proxy):
    # The node runs in a process of its own: only the proxy's memory is traced.
    proxy = await make_proxy([node_process()], health_interval=3600)
    payload = json.dumps({**GEN, "stream": False, "prompt": "y" * (16 * 1024 * 1024)}).encode()
    gc.collect()
    gc.disable()
    tracemalloc.start()
    try:
        response, _ = await fetch_stream(proxy.url + "/api/generate", payload)
        assert response.code == 200
        del response
        await asyncio.sleep(0.1)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        gc.enable()
    # Without a full garbage collection, nothing of the request is left.
    assert held < 4 * 1024 * 1024


async def test_the_model_of_a_huge_body_is_found_without_parsing_it(io_loop, node_process,
                                                                   make_proxy):
    proxy = await make_proxy([node_process("--embed-dim", "2")], health_interval=3600)
    # 24 MB of numbers: parsed whole it would take several times that.
    payload = b'{"input": "x", "model": "llama3", "options": {"numbers": [' + \
        b"0," * (12 * 1024 * 1024) + b'0]}, "truncate": true}'
    tracemalloc.start()
    try:
        response, _ = await fetch_stream(proxy.url + "/api/embed", payload)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert response.code == 200
    # The body as it arrives and joined, plus transport buffers; parsed whole
    # (a list of 12 million numbers) it would be over six times the body.
    assert peak < 4 * len(payload)
    bad = b'{"model": "llama3", "truncate": "yes", "x": [' + b"0," * 200_000 + b'0]}'
    response, arrivals = await fetch_stream(proxy.url + "/api/embed", bad)
    assert response.code == 400
    assert "truncate" in json.loads(b"".join(c for _, c in arrivals))["error"]
