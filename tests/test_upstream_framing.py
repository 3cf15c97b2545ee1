"""Upstream response framing: strict chunk sizes, and no byte a node sent
beyond its response is ever read as the answer to the next request."""
from __future__ import annotations

import ollama
import pytest
from tornado import httputil
from tornado.httpclient import AsyncHTTPClient

from aivonx.relay.upstream import MAX_CHUNK_DIGITS, check_trailer_line, parse_chunk_size
from tests.fakes.raw_node import RawNode, chunk, chunked_head, generation, response
from tests.helpers import wait_for


@pytest.fixture
def make_raw_node(io_loop):
    nodes: list[RawNode] = []

    async def make(answer) -> RawNode:
        node = await RawNode(answer).start()
        nodes.append(node)
        return node

    yield make

    async def stop_all() -> None:
        for node in nodes:
            await node.stop()

    io_loop.run_sync(stop_all)


def answers(first):
    """The first generate answered with `first`, every later one correctly."""
    def answer(n: int):
        return first if n == 1 else [response(generation(f"answer {n}"))]
    return answer


# -- the parser, without HTTP --------------------------------------------------

@pytest.mark.parametrize("line, size", [
    (b"0", 0), (b"1a", 26), (b"1A", 26), (b"0001a", 26), (b"ffffffffffffffff", 2**64 - 1),
    (b"1a;name", 26), (b"1a;name=value", 26), (b"1a ;name=\"quoted value\"", 26),
    (b"1a\t; a=b; c", 26),
])
def test_chunk_sizes_as_http_1_1_writes_them_are_read(line, size):
    assert parse_chunk_size(line) == size


@pytest.mark.parametrize("line", [
    b"0x1a", b"1_a", b"+1a", b"-1a", b" 1a", b"1a ", b"1a\t", b"", b";ext", b"g",
    b"1a\x00", b"1a;ext\x00", b"1a;ext\rx", b"1a\nff", b"\xef\xbc\x91",
    b"1" * (MAX_CHUNK_DIGITS + 1),
])
def test_any_other_chunk_size_line_is_refused(line):
    with pytest.raises(httputil.HTTPInputError, match="invalid chunk size"):
        parse_chunk_size(line)


def test_trailer_lines_are_field_lines():
    check_trailer_line(b"X-Checksum: abc")
    check_trailer_line(b"Server-Timing:dur=1")
    for line in (b"no colon", b": no name", b"bad name: x", b"X: a\x00b"):
        with pytest.raises(httputil.HTTPInputError, match="invalid trailer"):
            check_trailer_line(line)


# -- through the proxy, from a node that writes exact bytes -----------------------

def _loose_sizes():
    """Chunk-size lines int(x, 16) would read as the right size."""
    data = generation("late")
    digits = b"%x" % len(data)
    for line in (b"0x" + digits, b"+" + digits, b" " + digits, digits + b" ",
                 digits[:1] + b"_" + digits[1:]):
        yield pytest.param(line + b"\r\n" + data + b"\r\n", id=repr(line))


@pytest.mark.parametrize("bad_frame", _loose_sizes())
async def test_a_bad_chunk_size_ends_the_stream_with_an_error_and_its_connection(
        io_loop, make_raw_node, make_proxy, bad_frame):
    node = await make_raw_node(answers([
        chunked_head() + chunk(generation("tok0 ", done=False)), bad_frame + b"0\r\n\r\n"]))
    proxy = await make_proxy([node], health_interval=3600)
    client = ollama.AsyncClient(host=proxy.url)
    parts = []
    with pytest.raises(ollama.ResponseError, match="invalid chunk size line"):
        async for part in await client.generate(model="llama3", prompt="x", stream=True):
            parts.append(part.response)
    assert parts == ["tok0 "]  # nothing of the mis-framed chunk reached the client
    answer = await client.generate(model="llama3", prompt="x", stream=False)
    assert answer.response == "answer 2"
    first, second = node.generate_connections
    assert second != first
    # The proxy closed the mis-framed connection; only the good one is kept.
    await wait_for(lambda: node.open == 1)
    assert len(proxy.ctx.relay.client.pool.idle[("http", "127.0.0.1", node.port)]) == 1


SMUGGLED = response(generation("smuggled"))


@pytest.mark.parametrize("first", [
    pytest.param([response(generation("answer 1")) + SMUGGLED], id="beyond Content-Length"),
    pytest.param([response(b"hello" + SMUGGLED, length=5)], id="Content-Length 5, more sent"),
    pytest.param([chunked_head() + chunk(generation("answer 1")) + b"0\r\n\r\n" + SMUGGLED],
                 id="after the last chunk"),
])
async def test_bytes_beyond_a_response_never_answer_the_next_request(
        io_loop, make_raw_node, make_proxy, first):
    node = await make_raw_node(answers(first))
    proxy = await make_proxy([node], health_interval=3600)
    client = ollama.AsyncClient(host=proxy.url)
    try:
        await client.generate(model="llama3", prompt="x", stream=False)
    except ValueError:
        pass  # "hello" is no JSON answer; what matters is the next request
    answer = await client.generate(model="llama3", prompt="x", stream=False)
    assert answer.response == "answer 2"
    assert node.generate_connections[1] != node.generate_connections[0]


async def test_bytes_a_node_sends_on_an_idle_connection_are_never_read_as_an_answer(
        io_loop, make_raw_node, make_proxy):
    node = await make_raw_node(answers([response(generation("answer 1")), 0.05, SMUGGLED]))
    proxy = await make_proxy([node], health_interval=3600)
    client = ollama.AsyncClient(host=proxy.url)
    assert (await client.generate(model="llama3", prompt="x", stream=False)).response == \
        "answer 1"
    await wait_for(lambda: node.written == 2)  # the smuggled answer is on its way
    answer = await client.generate(model="llama3", prompt="x", stream=False)
    assert answer.response == "answer 2"


async def test_trailers_after_the_last_chunk_are_read_and_the_connection_kept(
        io_loop, make_raw_node, make_proxy):
    node = await make_raw_node(answers([
        chunked_head() + chunk(generation("tok0 ", done=False)) + chunk(generation("")) +
        b"0\r\nX-Checksum: abc\r\nServer-Timing: dur=1\r\n\r\n"]))
    proxy = await make_proxy([node], health_interval=3600)
    client = ollama.AsyncClient(host=proxy.url)
    parts = [p.response async for p in await client.generate(model="llama3", prompt="x",
                                                             stream=True)]
    assert parts == ["tok0 ", ""]
    assert (await client.generate(model="llama3", prompt="x", stream=False)).response == \
        "answer 2"
    assert node.generate_connections[0] == node.generate_connections[1]


GOOD_BODY = generation("answer 1")


@pytest.mark.parametrize("head, why", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: +%d\r\n\r\n", "invalid Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: %d, 7\r\n\r\n", "conflicting Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n",
     "both Transfer-Encoding and Content-Length"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nX-Length: %d\r\n\r\n",
     "unsupported Transfer-Encoding"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Folded: a\r\n b\r\n\r\n",
     "invalid header line"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nno colon here\r\n\r\n", "invalid header line"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Bad\x01: a\r\n\r\n", "invalid header line"),
    (b"HTTP/1.1 2000 OK\r\nContent-Length: %d\r\n\r\n", "start line"),
])
async def test_a_mis_framed_head_fails_the_request_and_closes_its_connection(
        io_loop, make_raw_node, make_proxy, head, why):
    """The relay's client reads heads strictly (aivonx.relay.leanclient): an answer whose
    framing is ambiguous is never relayed, and its connection is never reused."""
    node = await make_raw_node(answers([head % len(GOOD_BODY) + GOOD_BODY]))
    proxy = await make_proxy([node], health_interval=3600)
    client = ollama.AsyncClient(host=proxy.url)
    with pytest.raises(ollama.ResponseError, match=why) as raised:
        await client.generate(model="llama3", prompt="x", stream=False)
    assert raised.value.status_code == 503
    await wait_for(lambda: node.open == 0)
    assert not proxy.ctx.relay.client.pool.idle.get(("http", "127.0.0.1", node.port))


async def test_informational_answers_before_the_head_are_skipped(
        io_loop, make_raw_node, make_proxy):
    node = await make_raw_node(answers([
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"
        + response(generation("answer 1"))]))
    proxy = await make_proxy([node], health_interval=3600)
    client = ollama.AsyncClient(host=proxy.url)
    assert (await client.generate(model="llama3", prompt="x", stream=False)).response == \
        "answer 1"
    assert (await client.generate(model="llama3", prompt="x", stream=False)).response == \
        "answer 2"
    assert node.generate_connections[0] == node.generate_connections[1]


async def test_a_tab_inside_a_node_header_value_reaches_the_client(io_loop, make_raw_node,
                                                                   make_proxy):
    body = generation("tabbed")
    head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Node-Note: a\tb\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))
    node = await make_raw_node(answers([head + body]))
    proxy = await make_proxy([node], health_interval=3600)
    response = await AsyncHTTPClient().fetch(proxy.url + "/api/generate", method="POST",
                                             body=b'{"model": "llama3", "prompt": "x"}',
                                             raise_error=False)
    assert response.code == 200 and b"tabbed" in response.body
    assert response.headers["X-Node-Note"] == "a\tb"
