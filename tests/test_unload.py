"""Unload and load across the cluster: `ollama stop` (keep_alive 0 and
nothing to generate) reaches every node holding the model in memory; a
load goes to the one node routing picks. Driven with the real ollama client."""
from __future__ import annotations

import ollama
import pytest

from aivonx.modelops import is_unload, keep_alive_is_zero
from tests.helpers import call


def unloads(node) -> list:
    return [r for r in node.requests if r.path in ("/api/generate", "/api/chat")
            and r.json.get("keep_alive") in (0, "0s", "0")]


async def loaded_cluster(make_node, make_proxy, holding: int = 2, idle: int = 1):
    """Nodes that all have llama3, the first `holding` with it in memory."""
    nodes = [await make_node(["llama3:latest"]) for _ in range(holding + idle)]
    for node in nodes[:holding]:
        node.loaded.append("llama3:latest")
    proxy = await make_proxy(nodes, health_interval=3600)
    return proxy, nodes


async def test_ollama_generate_keep_alive_0_unloads_on_every_node_holding_the_model(
        io_loop, make_node, make_proxy):
    proxy, (a, b, idle) = await loaded_cluster(make_node, make_proxy)
    client = ollama.AsyncClient(host=proxy.url)
    assert {m.model for m in (await client.ps()).models} == {"llama3:latest"}
    answer = await client.generate("llama3", keep_alive=0)
    assert answer.done is True and answer.done_reason == "unload"
    assert answer.model == "llama3" and answer.response == ""
    assert len(unloads(a)) == 1 and len(unloads(b)) == 1 and unloads(idle) == []
    assert (await client.ps()).models == []
    # Routing's view (the registry, shown by the state API) knows at once.
    state = (await call(proxy, "GET", "/api/proxy/state")).json
    assert all(loaded == [] for loaded in state["loaded_models"].values())


async def test_chat_unload_streamed_answers_once_in_ollamas_shape(io_loop, make_node,
                                                                  make_proxy):
    proxy, (a, b, _) = await loaded_cluster(make_node, make_proxy)
    client = ollama.AsyncClient(host=proxy.url)
    parts = [p async for p in await client.chat("llama3:latest", messages=[], keep_alive="0s",
                                                stream=True)]
    assert len(parts) == 1 and parts[0].done_reason == "unload"
    assert parts[0].message.role == "assistant" and parts[0].message.content == ""
    assert [r.path for r in unloads(a) + unloads(b)] == ["/api/chat", "/api/chat"]
    assert a.loaded == [] and b.loaded == []


async def test_an_unload_of_a_model_nowhere_in_memory_reaches_one_node(io_loop, make_node,
                                                                       make_proxy):
    proxy, nodes = await loaded_cluster(make_node, make_proxy, holding=0, idle=2)
    answer = await ollama.AsyncClient(host=proxy.url).generate("llama3", keep_alive=0)
    assert answer.done_reason == "unload"
    assert sorted(len(unloads(n)) for n in nodes) == [0, 1]


async def test_an_unload_that_fails_on_a_node_names_it(io_loop, make_node, make_proxy):
    proxy, (a, b, _) = await loaded_cluster(make_node, make_proxy)
    b.fail_status = 500
    with pytest.raises(ollama.ResponseError) as info:
        await ollama.AsyncClient(host=proxy.url).generate("llama3", keep_alive=0)
    assert info.value.status_code == 500
    assert "unload failed on 1 of 2 node(s)" in info.value.error
    assert proxy.node(b).name in info.value.error and proxy.node(a).name not in info.value.error
    assert proxy.node(a).loaded == [] and proxy.node(b).loaded != []


async def test_a_load_goes_to_one_node(io_loop, make_node, make_proxy):
    proxy, nodes = await loaded_cluster(make_node, make_proxy, holding=2, idle=0)
    client = ollama.AsyncClient(host=proxy.url)
    assert (await client.generate("llama3")).done_reason == "load"
    assert (await client.chat("llama3", messages=[])).done_reason == "load"
    assert sum(len(n.requests_to("/api/generate")) for n in nodes) == 1
    assert sum(len(n.requests_to("/api/chat")) for n in nodes) == 1
    # keep_alive 0 with a prompt generates (and unloads after) on one node.
    assert (await client.generate("llama3", prompt="hi", keep_alive=0)).done_reason == "stop"
    assert sum(len(n.requests_to("/api/generate")) for n in nodes) == 2


@pytest.mark.parametrize("value, zero", [
    (0, True), (0.0, True), ("0", True), ("0s", True), ("-0", True), ("0m0s", True),
    ("0.0h", True), ("0.5ns", True), (-1, False), (-0.5, False), (1, False), ("5m", False),
    ("-1m", False), ("10", False), ("0x", False), ("", False), (None, False), (False, False),
    (True, False), ([], False),
])
def test_keep_alive_zero_is_read_as_ollama_reads_it(value, zero):
    assert keep_alive_is_zero(value) is zero


def test_an_unload_has_nothing_to_generate():
    assert is_unload({"model": "m", "keep_alive": 0}, "prompt")
    assert is_unload({"model": "m", "prompt": "", "keep_alive": "0"}, "prompt")
    assert is_unload({"model": "m", "messages": [], "keep_alive": 0}, "messages")
    assert not is_unload({"model": "m", "prompt": "hi", "keep_alive": 0}, "prompt")
    assert not is_unload({"model": "m", "messages": [{"role": "user"}], "keep_alive": 0},
                         "messages")
    assert not is_unload({"model": "m"}, "prompt")
