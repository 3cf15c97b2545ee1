"""Model operations across the cluster: the management pull and Ollama's own
pull, delete, copy, create and push, driven with the real ollama client."""
from __future__ import annotations

import asyncio
import socket
import time

import ollama
import pytest

from aivonx.modelops import NodeResult, ProgressMerger, common_refusal
from aivonx.registry import NodeState
from tests.helpers import admin_client, call, login, wait_for


async def test_management_pull_streams_tagged_progress_then_a_summary(
        io_loop, make_node, make_proxy):
    a, b = await make_node(["llama3:latest"]), await make_node(["llama3:latest"])
    proxy = await make_proxy([a, b], health_interval=3600)
    token = await login(proxy)
    answer = await call(proxy, "POST", "/api/proxy/pull", {"model": "qwen3:8b"}, token=token)
    assert answer.code == 200 and answer.headers["Content-Type"] == "application/x-ndjson"
    lines = answer.lines
    ids = {proxy.node(a).id: a, proxy.node(b).id: b}
    for node_id in ids:
        mine = [line for line in lines[:-1] if line["node_id"] == node_id]
        assert mine[0]["status"] == "pulling manifest"
        assert any("digest" in line and line["completed"] <= line["total"] for line in mine)
        assert mine[0]["node"] == proxy.ctx.registry.nodes[node_id].name
    summary = lines[-1]
    assert summary["done"] is True and summary["status"] == "success"
    assert sorted(r["node_id"] for r in summary["results"]) == sorted(ids)
    assert all(r["status"] == "success" for r in summary["results"])
    # Routing and the state know the model at once (no health cycle ran).
    state = (await call(proxy, "GET", "/api/proxy/state")).json
    assert all("qwen3:8b" in state["models"][n.url] for n in (a, b))
    client = ollama.AsyncClient(host=proxy.url)
    assert (await client.generate(model="qwen3:8b", prompt="x", stream=False)).done


async def test_management_pull_without_stream_and_on_one_node(io_loop, make_node, make_proxy):
    a, b = await make_node(), await make_node()
    proxy = await make_proxy([a, b], health_interval=3600)
    token = await login(proxy)
    node_id = proxy.node(b).id
    answer = await call(proxy, "POST", "/api/proxy/pull",
                        {"model": "phi3", "node_id": node_id, "stream": False}, token=token)
    assert answer.code == 200 and answer.headers["Content-Type"].startswith("application/json")
    assert answer.json["results"] == [{"node_id": node_id, "node": proxy.node(b).name,
                                       "status": "success"}]
    assert "phi3:latest" in b.models and "phi3:latest" not in a.models
    assert a.requests_to("/api/pull") == []
    assert b.requests_to("/api/pull")[0].json == {"model": "phi3", "insecure": False,
                                                  "stream": True}


async def test_management_pull_reports_the_nodes_that_failed(io_loop, make_node, make_proxy):
    good, bad = await make_node(), await make_node()
    proxy = await make_proxy([good, bad], health_interval=3600)
    token = await login(proxy)
    bad.die_after = 2  # the connection drops in the middle of the pull
    answer = await call(proxy, "POST", "/api/proxy/pull", {"model": "phi3", "stream": False},
                        token=token)
    assert answer.code == 502
    summary = answer.json
    assert summary["status"] == "error" and proxy.node(bad).name in summary["error"]
    by_id = {r["node_id"]: r for r in summary["results"]}
    assert by_id[proxy.node(good).id]["status"] == "success"
    assert "error" in by_id[proxy.node(bad).id]
    answer = await call(proxy, "POST", "/api/proxy/pull", {"model": "gemma3"}, token=token)
    assert answer.code == 200 and answer.lines[-1]["status"] == "error"


@pytest.mark.parametrize("body, status, message", [
    ({}, 400, "model is required"),
    ({"model": 5}, 400, "invalid value for 'model': expected a string"),
    ({"model": "bad name!"}, 400, "invalid model name"),
    ({"model": "phi3", "node_id": "1"}, 400, "invalid value for 'node_id'"),
    ({"model": "phi3", "node_id": True}, 400, "invalid value for 'node_id'"),
    ({"model": "phi3", "node_id": 999}, 404, "node 999 not found"),
    ({"model": "phi3", "stream": "yes"}, 400, "invalid value for 'stream'"),
])
async def test_management_pull_validation(io_loop, make_node, make_proxy, body, status,
                                          message):
    node = await make_node()
    proxy = await make_proxy([node], health_interval=3600)
    answer = await call(proxy, "POST", "/api/proxy/pull", body, token=await login(proxy))
    assert answer.code == status and message in answer.json["error"], answer
    assert node.requests_to("/api/pull") == []


async def test_a_client_leaving_a_pull_closes_the_upstream_connections(
        io_loop, make_node, make_proxy):
    a, b = await make_node(chunk_delay=0.5), await make_node(chunk_delay=0.5)
    proxy = await make_proxy([a, b], health_interval=3600)
    token = await login(proxy)
    sock = socket.create_connection(("127.0.0.1", proxy.port))
    sock.setblocking(False)
    body = b'{"model": "phi3"}'
    sock.sendall(b"POST /api/proxy/pull HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + token.encode() + b"\r\nContent-Length: "
                 + str(len(body)).encode() + b"\r\n\r\n" + body)
    await wait_for(lambda: a.requests_to("/api/pull") and b.requests_to("/api/pull"),
                   timeout=2)
    await asyncio.sleep(0.1)
    closed = time.monotonic()
    sock.close()
    await wait_for(lambda: all(n.requests_to("/api/pull")[0].client_closed_at for n in (a, b)),
                   timeout=2)
    for node in (a, b):
        record = node.requests_to("/api/pull")[0]
        assert record.client_closed_at - closed < 0.3 and record.finished_at is None
    assert "phi3:latest" not in a.models


async def test_ollama_client_pull_merges_progress_across_nodes(io_loop, make_node, make_proxy):
    a, b = await make_node(), await make_node()
    proxy = await make_proxy([a, b], health_interval=3600)
    client = await admin_client(proxy)
    parts = [part async for part in await client.pull("qwen3:8b", stream=True)]
    assert parts[0].status == "pulling manifest" and parts[-1].status == "success"
    statuses = [p.status for p in parts]
    assert statuses.count("pulling manifest") == 1 and statuses.count("success") == 1
    layers = [p for p in parts if p.digest]
    # The last count of each layer is the sum over both nodes.
    last = {p.digest: p for p in layers}
    assert all(p.total == 2 * 1_000_000 * (i + 1) and p.completed == p.total
               for i, p in enumerate(sorted(last.values(), key=lambda p: p.total)))
    assert "qwen3:8b" in a.models and "qwen3:8b" in b.models
    assert (await client.pull("phi3", stream=False)).status == "success"
    tags = await ollama.AsyncClient(host=proxy.url).list()
    assert {"phi3:latest", "qwen3:8b"} <= {m.model for m in tags.models}


async def test_merged_pull_progress_never_goes_back_when_nodes_report_apart(
        io_loop, make_node, make_proxy):
    quick, slow = await make_node(), await make_node(chunk_delay=0.1)
    proxy = await make_proxy([quick, slow], health_interval=3600)
    client = await admin_client(proxy)
    parts = [part async for part in await client.pull("qwen3:8b", stream=True)]
    assert parts[-1].status == "success"
    layers: dict[str, list] = {}
    for part in parts:
        if part.digest:
            layers.setdefault(part.digest, []).append((part.total, part.completed or 0))
    assert len(layers) == 2
    for counts in layers.values():
        totals = {total for total, _ in counts}
        assert len(totals) == 1  # the first total is the last
        total = totals.pop()
        completed = [done for _, done in counts]
        assert completed == sorted(completed) and completed[-1] == total
        assert all(done <= total for done in completed)
    # The quick node finished before the slow one reported: without the rule
    # a layer would have gone from 1.0 back to 0.75.
    assert quick.requests_to("/api/pull")[0].finished_at < \
        slow.requests_to("/api/pull")[0].finished_at


async def test_ollama_client_pull_fails_naming_the_failed_node(io_loop, make_node, make_proxy):
    good, bad = await make_node(), await make_node()
    proxy = await make_proxy([good, bad], health_interval=3600)
    client = await admin_client(proxy)
    bad.die_after = 3
    with pytest.raises(ollama.ResponseError) as info:
        async for _ in await client.pull("phi3", stream=True):
            pass
    assert "pull failed on 1 of 2 node(s)" in str(info.value)
    assert proxy.node(bad).name in str(info.value)
    with pytest.raises(ollama.ResponseError) as info:
        await client.pull("gemma3", stream=False)
    assert info.value.status_code == 500 and proxy.node(bad).name in info.value.error


async def test_ollama_model_operations_need_an_admin_token(io_loop, make_node, make_proxy):
    node = await make_node()
    proxy = await make_proxy([node], health_interval=3600)
    client = ollama.AsyncClient(host=proxy.url)
    for operation in (lambda: client.pull("phi3", stream=False), lambda: client.delete("llama3"),
                      lambda: client.copy("llama3", "x"), lambda: client.push("llama3"),
                      lambda: client.create("x", from_="llama3")):
        with pytest.raises(ollama.ResponseError) as info:
            await operation()
        assert info.value.status_code == 401
        assert info.value.error == "authentication required"
    assert node.models == ["llama3:latest"]


async def test_ollama_delete_removes_the_model_everywhere(io_loop, make_node, make_proxy):
    a = await make_node(["llama3:latest", "qwen3:8b"])
    b = await make_node(["llama3:latest"])
    proxy = await make_proxy([a, b], health_interval=3600)
    client = await admin_client(proxy)
    assert (await client.delete("llama3")).status == "success"
    assert a.models == ["qwen3:8b"] and b.models == []
    # Routing knows at once.
    with pytest.raises(ollama.ResponseError) as info:
        await ollama.AsyncClient(host=proxy.url).generate(model="llama3", prompt="x")
    assert info.value.status_code == 404
    assert (await client.delete("qwen3:8b")).status == "success"
    with pytest.raises(ollama.ResponseError) as info:
        await client.delete("qwen3:8b")
    assert info.value.status_code == 404 and info.value.error == "model 'qwen3:8b' not found"


async def test_ollama_copy_runs_on_the_nodes_having_the_source(io_loop, make_node, make_proxy):
    a = await make_node(["llama3:latest"])
    b = await make_node(["qwen3:8b"])
    proxy = await make_proxy([a, b], health_interval=3600)
    client = await admin_client(proxy)
    assert (await client.copy("llama3", "llama3-backup")).status == "success"
    assert "llama3-backup:latest" in a.models and b.requests_to("/api/copy") == []
    plain = ollama.AsyncClient(host=proxy.url)
    assert (await plain.generate(model="llama3-backup", prompt="x", stream=False)).done
    with pytest.raises(ollama.ResponseError) as info:
        await client.copy("nothere", "x")
    assert info.value.status_code == 404
    answer = await call(proxy, "POST", "/api/copy", {"source": "llama3", "destination": ""},
                        token=await login(proxy))
    assert answer.code == 400 and answer.json == {"error": 'destination "" is invalid'}


async def test_ollama_create_goes_to_the_nodes_having_from(io_loop, make_node, make_proxy):
    a = await make_node(["llama3:latest"])
    b = await make_node(["qwen3:8b"])
    proxy = await make_proxy([a, b], health_interval=3600)
    client = await admin_client(proxy)
    parts = [p async for p in await client.create("mario", from_="llama3", stream=True)]
    assert parts[-1].status == "success"
    assert "mario:latest" in a.models and b.requests_to("/api/create") == []
    assert (await client.create("luigi", stream=False)).status == "success"
    assert "luigi:latest" in a.models and "luigi:latest" in b.models


async def test_ollama_push_sends_one_copy(io_loop, make_node, make_proxy):
    a = await make_node(["me/model:latest"])
    b = await make_node(["me/model:latest"])
    proxy = await make_proxy([a, b], health_interval=3600)
    client = await admin_client(proxy)
    parts = [p async for p in await client.push("me/model", stream=True)]
    assert parts[0].status == "retrieving manifest" and parts[-1].status == "success"
    assert len(a.requests_to("/api/push")) + len(b.requests_to("/api/push")) == 1
    with pytest.raises(ollama.ResponseError) as info:
        await client.push("me/other")
    assert info.value.status_code == 404


def test_progress_merger_sums_layers_and_sends_each_status_once():
    n1 = NodeState(id=1, name="a", address="a", port=1)
    n2 = NodeState(id=2, name="b", address="b", port=1)
    merger = ProgressMerger()
    assert merger.feed(n1, {"status": "pulling manifest"}) == {"status": "pulling manifest"}
    assert merger.feed(n2, {"status": "pulling manifest"}) is None
    layer = {"status": "pulling abc", "digest": "sha256:abc"}
    assert merger.feed(n1, {**layer, "total": 10, "completed": 5}) == {
        **layer, "total": 10, "completed": 5}
    assert merger.feed(n2, {**layer, "total": 10}) == {**layer, "total": 20, "completed": 5}
    assert merger.feed(n2, {**layer, "total": 10, "completed": True}) == {
        **layer, "total": 20, "completed": 5}  # nothing a node sends is trusted
    assert merger.feed(n1, {"status": "success"}) is None
    assert merger.feed(n1, {"error": "boom"}) is None
    assert merger.feed(n1, {"status": 5}) is None


def test_merged_progress_counts_the_nodes_yet_to_report_a_layer():
    a = NodeState(id=1, name="a", address="a", port=1)
    b = NodeState(id=2, name="b", address="b", port=1)
    merger = ProgressMerger(nodes=2)
    layer = {"status": "pulling abc", "digest": "sha256:abc"}
    sent = [merger.feed(node, {**layer, "total": 10, "completed": done})
            for node, done in ((a, 5), (a, 10), (b, 5), (b, 10))]
    # The total is the final one from the first line (the CLI draws its bar
    # from it); the fraction only grows: 0.25, 0.5, 0.75, 1.0.
    assert [(s["total"], s["completed"]) for s in sent] == [(20, 5), (20, 10), (20, 15),
                                                             (20, 20)]


def test_merged_progress_holds_back_a_line_that_would_go_back():
    a = NodeState(id=1, name="a", address="a", port=1)
    b = NodeState(id=2, name="b", address="b", port=1)
    merger = ProgressMerger(nodes=2)
    layer = {"status": "pulling abc", "digest": "sha256:abc"}
    assert merger.feed(a, {**layer, "total": 10, "completed": 8})["completed"] == 8
    assert merger.feed(a, {**layer, "total": 10, "completed": 4}) is None  # a part restarted
    assert merger.feed(a, {**layer, "total": 10, "completed": 10})["completed"] == 10
    # b reports the layer bigger than a did: 13/40 would be less than 10/20.
    assert merger.feed(b, {**layer, "total": 30, "completed": 3}) is None
    assert merger.feed(b, {**layer, "total": 30, "completed": 30}) == {
        **layer, "total": 40, "completed": 40}
    alone = ProgressMerger(nodes=1)
    assert alone.feed(a, {**layer, "total": 10, "completed": 15}) == {
        **layer, "total": 10, "completed": 10}  # never more than the total
    unknown = ProgressMerger()
    assert unknown.feed(a, {**layer, "total": 10, "completed": 5})["completed"] == 5
    assert unknown.feed(a, {**layer, "total": 10, "completed": 3}) is None


def test_a_request_every_node_refuses_alike_is_the_clients_error():
    bad = NodeResult(400, "invalid model name")
    assert common_refusal({1: bad, 2: NodeResult(400, "x")}) == (400, "invalid model name")
    assert common_refusal({1: bad, 2: NodeResult(404, "x")}) is None
    assert common_refusal({1: bad, 2: NodeResult(200)}) is None
    assert common_refusal({1: NodeResult(500, "boom")}) is None
    assert common_refusal({1: NodeResult(None, "refused")}) is None
    assert common_refusal({}) is None
