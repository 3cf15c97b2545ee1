"""The management API over HTTP: state, active requests, routing config and
nodes, with every change visible in /api/proxy/state and in real routing."""
from __future__ import annotations

import asyncio
import json

import ollama
import pytest

from aivonx.relay.resolver import parse_networks
from tests.helpers import call, login
from tests.helpers import wait_for


async def generate_on(proxy, model: str = "llama3") -> None:
    client = ollama.AsyncClient(host=proxy.url)
    assert (await client.generate(model=model, prompt="x", stream=False)).done


def served(*nodes) -> list[int]:
    return [len(n.requests_to("/api/generate")) for n in nodes]


async def test_proxy_readiness_follows_the_routable_nodes(io_loop, make_node, make_proxy):
    node = await make_node()
    proxy = await make_proxy([node])
    answer = await call(proxy, "GET", "/api/proxy")
    assert answer.code == 200
    assert answer.json == {"status": "ok", "routable_nodes": 1, "total_nodes": 1}
    await node.stop()
    await proxy.probe()
    answer = await call(proxy, "GET", "/api/proxy")
    assert answer.code == 503 and answer.json["error"] == "no node is available"
    empty = await make_proxy()
    assert (await call(empty, "GET", "/api/proxy")).code == 503


async def test_state_is_strict_json_with_the_documented_keys(io_loop, make_node, make_proxy):
    up = await make_node(["llama3:latest", "qwen3:8b"])
    down = await make_node([])
    await down.stop()  # never seen up: its latency is unknown
    proxy = await make_proxy([up, down])
    answer = await call(proxy, "GET", "/api/proxy/state")
    assert answer.code == 200
    state = answer.json  # raises on Infinity/NaN
    assert state["active"] == [up.url] and state["standby"] == [down.url]
    assert state["node_id_map"] == {str(proxy.node(up).id): up.url,
                                    str(proxy.node(down).id): down.url}
    assert isinstance(state["latencies"][up.url], float)
    assert state["latencies"][down.url] is None
    assert state["active_counts"] == {up.url: 0, down.url: 0}
    assert state["models"][up.url] == ["llama3:latest", "qwen3:8b"]


async def test_active_requests_counts_streams_in_flight(io_loop, make_node, make_proxy):
    slow = await make_node(chunks=20, chunk_delay=0.05)
    idle = await make_node()
    proxy = await make_proxy([slow, idle])
    slow_id, idle_id = proxy.node(slow).id, proxy.node(idle).id
    client = ollama.AsyncClient(host=proxy.url)
    proxy.ctx.registry.nodes[idle_id].enabled = False  # everything goes to the slow node
    streams = [asyncio.ensure_future(client.generate(model="llama3", prompt="x", stream=False))
               for _ in range(2)]
    await wait_for(lambda: proxy.node(slow).active_requests == 2, timeout=3)
    answer = await call(proxy, "GET", "/api/proxy/active-requests")
    assert answer.code == 200
    body = answer.json
    assert body["total_active_requests"] == 2
    by_id = {n["id"]: n for n in body["nodes"]}
    assert by_id[slow_id]["active_requests"] == 2 and by_id[idle_id]["active_requests"] == 0
    assert set(by_id[slow_id]) >= {"id", "name", "address", "active_requests", "status",
                                   "latency", "models"}
    assert by_id[slow_id]["models"] == ["llama3:latest"]
    one = (await call(proxy, "GET", f"/api/proxy/active-requests?node_id={slow_id}")).json
    assert [n["id"] for n in one["nodes"]] == [slow_id] and one["total_active_requests"] == 2
    await asyncio.gather(*streams)
    for query, status in (("node_id=999", 404), ("node_id=abc", 400), ("node_id=1.5", 400),
                          ("node_id=" + "9" * 40, 400)):
        answer = await call(proxy, "GET", f"/api/proxy/active-requests?{query}")
        assert answer.code == status and "error" in answer.json, (query, answer)


async def test_strategy_change_takes_effect_on_the_next_request_and_persists(
        io_loop, make_node, make_proxy, tmp_path):
    a, b = await make_node(), await make_node()
    db = str(tmp_path / "strategy.db")
    proxy = await make_proxy([a, b], db=db)
    token = await login(proxy)
    answer = await call(proxy, "PUT", "/api/proxy/config", {"strategy": "round_robin"},
                        token=token)
    assert answer.code == 200 and answer.json["strategy"] == "round_robin"
    assert "least_active" in answer.json["strategies"]
    assert (await call(proxy, "GET", "/api/proxy/state")).json["strategy"] == "round_robin"
    for _ in range(4):
        await generate_on(proxy)
    assert served(a, b) == [2, 2]
    answer = await call(proxy, "PATCH", "/api/proxy/config", {}, token=token)
    assert answer.code == 200 and answer.json["strategy"] == "round_robin"
    await proxy.stop()
    proxy = await make_proxy(db=db)
    token = await login(proxy)
    answer = await call(proxy, "GET", "/api/proxy/config", token=token)
    assert answer.json["strategy"] == "round_robin"


@pytest.mark.parametrize("method, body, field, text", [
    ("PUT", {"strategy": "fastest"}, "strategy",
     "unknown strategy 'fastest'; valid: least_active, lowest_latency, round_robin"),
    ("PATCH", {"strategy": 3}, "strategy", "must be a string"),
    ("PUT", {}, "strategy", "this field is required"),
])
async def test_invalid_config_is_refused_naming_the_valid_strategies(
        io_loop, make_proxy, method, body, field, text):
    proxy = await make_proxy()
    token = await login(proxy)
    answer = await call(proxy, method, "/api/proxy/config", body, token=token)
    assert answer.code == 400
    assert answer.json["error"] == "validation failed"
    assert text in answer.json["fields"][field]
    assert proxy.ctx.router.strategy == "cache_aware"
    answer = await call(proxy, "PUT", "/api/proxy/config", raw=b"{bad", token=token)
    assert answer.code == 400 and "invalid JSON" in answer.json["error"]
    assert "invalid JSON" in answer.json["fields"]["non_field_errors"]


async def test_every_validation_400_names_its_fields(io_loop, make_proxy):
    """The OpenAPI document promises `fields` with every 400 of these."""
    proxy = await make_proxy(health_interval=3600)
    token = await login(proxy)
    node = (await call(proxy, "POST", "/api/proxy/nodes", {"address": "gpu1"}, token=token)).json
    for method, path in [("PUT", "/api/proxy/config"), ("PATCH", "/api/proxy/config"),
                         ("POST", "/api/proxy/nodes"), ("PUT", f"/api/proxy/nodes/{node['id']}"),
                         ("PATCH", f"/api/proxy/nodes/{node['id']}")]:
        for raw, words in ((b"", "missing request body"), (b"{bad", "invalid JSON"),
                           (b"[1]", "must be a JSON object"), (b"\xff", "not UTF-8")):
            answer = await call(proxy, method, path, raw=raw, token=token)
            assert answer.code == 400, (method, path, raw, answer)
            assert words in answer.json["error"], (method, path, raw, answer)
            assert words in answer.json["fields"]["non_field_errors"], (method, path, raw)


async def test_a_new_node_is_probed_and_routed_to_at_once(io_loop, make_node, make_proxy):
    first = await make_node(["llama3:latest"])
    second = await make_node(["qwen3:8b"])
    proxy = await make_proxy([first], health_interval=3600)
    token = await login(proxy)
    answer = await call(proxy, "POST", "/api/proxy/nodes",
                        {"name": "gpu2", "address": "http://127.0.0.1", "port": second.port},
                        token=token)
    assert answer.code == 201, answer
    node = answer.json
    assert set(node) == {"id", "name", "address", "port", "active", "slots", "weight",
                         "created_at"}
    assert (node["name"], node["address"], node["port"], node["active"]) == (
        "gpu2", "127.0.0.1", second.port, True)
    assert (node["slots"], node["weight"]) == (4, 1.0)  # Ollama's parallelism, equal share
    assert node["created_at"].endswith("+00:00")
    assert answer.headers["Location"] == f"/api/proxy/nodes/{node['id']}"
    # In the state at once; routable as soon as its probe answered (no
    # health cycle for an hour).
    assert second.url in (await call(proxy, "GET", "/api/proxy/state")).json["node_id_map"].values()
    await wait_for(lambda: proxy.node(second).status == "active", timeout=2)
    await generate_on(proxy, "qwen3:8b")
    assert served(second) == [1]


async def test_node_crud_and_pagination(io_loop, make_proxy):
    proxy = await make_proxy(health_interval=3600)
    token = await login(proxy)
    ids = []
    for i in range(5):
        answer = await call(proxy, "POST", "/api/proxy/nodes",
                            {"address": f"https://gpu{i}.example", "port": 11434},
                            token=token)
        assert answer.code == 201
        ids.append(answer.json["id"])
    assert answer.json["name"] == "gpu4.example:11434"
    assert answer.json["address"] == "https://gpu4.example"
    page = (await call(proxy, "GET", "/api/proxy/nodes?limit=2&offset=2", token=token)).json
    assert page["count"] == 5 and [n["id"] for n in page["results"]] == ids[2:4]
    assert page["next"] == "/api/proxy/nodes?limit=2&offset=4"
    assert page["previous"] == "/api/proxy/nodes?limit=2&offset=0"
    last = (await call(proxy, "GET", page["next"], token=token)).json
    assert [n["id"] for n in last["results"]] == ids[4:] and last["next"] is None
    whole = (await call(proxy, "GET", "/api/proxy/nodes", token=token)).json
    assert whole["count"] == 5 and whole["previous"] is None and len(whole["results"]) == 5
    for query in ("limit=0", "limit=x", "offset=-1", "limit=100000"):
        answer = await call(proxy, "GET", f"/api/proxy/nodes?{query}", token=token)
        assert answer.code == 400 and answer.json["error"] == "validation failed", query

    url = f"/api/proxy/nodes/{ids[0]}"
    one = (await call(proxy, "GET", url, token=token)).json
    assert one["id"] == ids[0]
    answer = await call(proxy, "PATCH", url, {"name": "renamed"}, token=token)
    assert answer.code == 200 and answer.json["name"] == "renamed"
    assert proxy.ctx.registry.nodes[ids[0]].name == "renamed"
    answer = await call(proxy, "PUT", url, {"address": "10.1.2.3:8080"}, token=token)
    assert answer.code == 200
    assert (answer.json["address"], answer.json["port"]) == ("10.1.2.3", 8080)
    assert proxy.ctx.registry.nodes[ids[0]].url == "http://10.1.2.3:8080"
    answer = await call(proxy, "DELETE", url, token=token)
    assert answer.code == 204 and answer.text == ""
    assert ids[0] not in proxy.ctx.registry.nodes
    assert str(ids[0]) not in (await call(proxy, "GET", "/api/proxy/state")).json["node_id_map"]
    for method in ("GET", "PATCH", "PUT", "DELETE"):
        for missing in (url, "/api/proxy/nodes/99999999999999999999999999"):
            answer = await call(proxy, method, missing, {"address": "h"}, token=token)
            assert answer.code == 404 and "not found" in answer.json["error"], (method, answer)


async def test_pagination_links_never_echo_the_clients_host(io_loop, make_proxy):
    proxy = await make_proxy(health_interval=3600)
    token = await login(proxy)
    for i in range(3):
        await call(proxy, "POST", "/api/proxy/nodes", {"address": f"gpu{i}"}, token=token)
    page = (await call(proxy, "GET", "/api/proxy/nodes?limit=1&offset=1", token=token,
                       headers={"Host": "evil.example", "X-Forwarded-Host": "evil.example"})).json
    assert (page["previous"], page["next"]) == ("/api/proxy/nodes?limit=1&offset=0",
                                                "/api/proxy/nodes?limit=1&offset=2")


@pytest.mark.parametrize("path,field", [
    ("/api/proxy/active-requests?node_id=--1", "node_id"),
    ("/api/proxy/active-requests?node_id=%C2%B2", "node_id"),        # ²
    ("/api/proxy/active-requests?node_id=%D9%A3", "node_id"),        # Arabic-Indic 3
    ("/api/proxy/active-requests?node_id=1-", "node_id"),
    ("/api/proxy/active-requests?node_id=" + "9" * 5000, "node_id"),
    ("/api/proxy/nodes?limit=--5", "limit"),
    ("/api/proxy/nodes?limit=%C2%B2", "limit"),
    ("/api/proxy/nodes?offset=--0", "offset"),
])
async def test_malformed_integers_are_a_400_naming_the_field(io_loop, make_proxy, path, field):
    proxy = await make_proxy(health_interval=3600)
    token = await login(proxy)
    answer = await call(proxy, "GET", path, token=token)
    assert answer.code == 400, answer
    assert answer.json["error"] == "validation failed" and field in answer.json["fields"]


async def test_any_64_bit_node_id_is_looked_up(io_loop, make_node, make_proxy):
    proxy = await make_proxy([await make_node()], health_interval=3600)
    token = await login(proxy)
    largest = 2 ** 63 - 1
    for path in (f"/api/proxy/active-requests?node_id={largest}",
                 f"/api/proxy/active-requests?node_id={-2 ** 63}",
                 f"/api/proxy/nodes/{largest}", f"/api/proxy/nodes/{2 ** 63}",
                 "/api/proxy/nodes/" + "9" * 5000):
        answer = await call(proxy, "GET", path, token=token)
        assert answer.code == 404 and "not found" in answer.json["error"], (path, answer)
    node_id = next(iter(proxy.registry.nodes))
    padded = f"{node_id:019d}"
    assert (await call(proxy, "GET", f"/api/proxy/nodes/{padded}", token=token)).code == 200
    answer = await call(proxy, "GET", f"/api/proxy/active-requests?node_id={padded}")
    assert answer.code == 200 and [n["id"] for n in answer.json["nodes"]] == [node_id]


@pytest.mark.parametrize("body, fields", [
    ({}, {"address": "this field is required"}),
    ({"address": "bad host!"}, {"address": "'bad host!' is not a valid host name or IP address"}),
    ({"address": "ftp://h"}, {"address": "address scheme must be http or https"}),
    ({"address": "http://h/path"}, {"address": "address must be a host, an IP or an http(s) "
                                               "URL without a path"}),
    ({"address": 42}, {"address": "address must be a string"}),
    ({"address": "http://[::1"}, {"address": "invalid address: Invalid IPv6 URL"}),
    ({"address": "[fe80::1"}, {"address": "invalid address: Invalid IPv6 URL"}),
    ({"address": "h", "port": 0}, {"port": "port must be an integer between 1 and 65535"}),
    ({"address": "h", "port": 65536}, {"port": "port must be an integer between 1 and 65535"}),
    ({"address": "h", "port": "abc"}, {"port": "port must be an integer between 1 and 65535"}),
    ({"address": "h", "port": True}, {"port": "port must be an integer between 1 and 65535"}),
    ({"address": "h", "port": 1.5}, {"port": "port must be an integer between 1 and 65535"}),
    ({"address": "h:1234", "port": 80}, {"port": "conflicts with the port in address (1234)"}),
    *[({"address": text}, {"address": "the port in address must be between 1 and 65535"})
      for text in ("h:0", "http://10.0.0.1:0", "https://[::1]:0", "h:00")],
    ({"address": "h", "name": ""}, {"name": "name may not be blank"}),
    ({"address": "h", "name": "n" * 101}, {"name": "name must have at most 100 characters"}),
    ({"address": "h", "name": "a\nb"}, {"name": "name may not contain control characters"}),
    ({"address": "h", "active": "yes"}, {"active": "must be true or false"}),
    ({"address": None, "port": None}, {"address": "may not be null", "port": "may not be null"}),
    *[({"address": "h", "slots": bad}, {"slots": "slots must be an integer between 1 and 1024"})
      for bad in (0, -1, 1025, 10 ** 30, 2.5, 4.0, "4", True, [4], {"n": 4})],
    *[({"address": "h", "weight": bad},
       {"weight": "weight must be a number greater than 0 and at most 100"})
      for bad in (0, 0.0, -1, 100.5, 10 ** 400, float("nan"), float("inf"), float("-inf"),
                  "3", True, False, [1])],
    ({"address": "h", "slots": None, "weight": None},
     {"slots": "may not be null", "weight": "may not be null"}),
    ({"address": "h", "port": 0, "slots": 0, "weight": 0},
     {"port": "port must be an integer between 1 and 65535",
      "slots": "slots must be an integer between 1 and 1024",
      "weight": "weight must be a number greater than 0 and at most 100"}),
])
async def test_node_validation_names_each_bad_field(io_loop, make_proxy, body, fields):
    proxy = await make_proxy(health_interval=3600)
    token = await login(proxy)
    answer = await call(proxy, "POST", "/api/proxy/nodes", body, token=token)
    assert answer.code == 400
    assert answer.json == {"error": "validation failed", "fields": fields}
    assert (await call(proxy, "GET", "/api/proxy/nodes", token=token)).json["count"] == 0


async def test_duplicate_address_and_port_is_a_409(io_loop, make_proxy):
    proxy = await make_proxy(health_interval=3600)
    token = await login(proxy)
    first = (await call(proxy, "POST", "/api/proxy/nodes", {"address": "gpu1"},
                        token=token)).json
    second = (await call(proxy, "POST", "/api/proxy/nodes", {"address": "gpu2"},
                         token=token)).json
    for body in ({"address": "gpu1"}, {"address": "http://GPU1:11434"},
                 {"address": "gpu1", "port": 11434}):
        answer = await call(proxy, "POST", "/api/proxy/nodes", body, token=token)
        assert answer.code == 409, answer
        assert "already exists" in answer.json["fields"]["address"]
    answer = await call(proxy, "PATCH", f"/api/proxy/nodes/{second['id']}",
                        {"address": "gpu1"}, token=token)
    assert answer.code == 409
    # Saving a node with its own address is no conflict.
    answer = await call(proxy, "PUT", f"/api/proxy/nodes/{first['id']}",
                        {"address": "gpu1", "name": "one"}, token=token)
    assert answer.code == 200


async def test_bodies_that_are_not_objects_are_400(io_loop, make_proxy):
    proxy = await make_proxy(health_interval=3600)
    token = await login(proxy)
    for raw in (b"", b"[]", b"null", b"{", b"\xff\xfe"):
        answer = await call(proxy, "POST", "/api/proxy/nodes", raw=raw, token=token)
        assert answer.code == 400 and "error" in answer.json, (raw, answer)
    answer = await call(proxy, "POST", "/api/proxy/nodes", raw=b" " * (2 * 1024 * 1024),
                        token=token)
    assert answer.code == 413


async def test_moving_a_node_routes_to_the_new_machine(io_loop, make_node, make_proxy):
    old = await make_node(["llama3:latest"])
    new = await make_node(["qwen3:8b"])
    proxy = await make_proxy([old], health_interval=3600)
    token = await login(proxy)
    node_id = proxy.node(old).id
    answer = await call(proxy, "PATCH", f"/api/proxy/nodes/{node_id}", {"port": new.port},
                        token=token)
    assert answer.code == 200
    # The old machine's models are forgotten at once, the new one's probed.
    state = proxy.ctx.registry.nodes[node_id]
    assert "llama3:latest" not in state.models.values()
    await wait_for(lambda: state.status == "active" and "qwen3:8b" in state.models.values(),
                   timeout=2)
    await generate_on(proxy, "qwen3:8b")
    assert served(new) == [1]
    with pytest.raises(ollama.ResponseError) as info:
        await generate_on(proxy, "llama3")
    assert info.value.status_code == 404


async def test_draining_a_node_lets_streams_finish_and_sends_nothing_new(
        io_loop, make_node, make_proxy):
    a = await make_node(chunks=10, chunk_delay=0.05)
    b = await make_node()
    proxy = await make_proxy([a, b], health_interval=0.2)
    token = await login(proxy)
    a_id = proxy.node(a).id
    proxy.ctx.registry.nodes[proxy.node(b).id].enabled = False  # the stream starts on a
    client = ollama.AsyncClient(host=proxy.url)
    stream = await client.generate(model="llama3", prompt="x", stream=True)
    first = await stream.__anext__()
    proxy.ctx.registry.nodes[proxy.node(b).id].enabled = True
    answer = await call(proxy, "PATCH", f"/api/proxy/nodes/{a_id}", {"active": False},
                        token=token)
    assert answer.code == 200 and answer.json["active"] is False
    state = (await call(proxy, "GET", "/api/proxy/state")).json
    assert a.url in state["standby"] and a.url not in state["active"]
    # New requests go elsewhere while the stream goes on to the end.
    for _ in range(3):
        await generate_on(proxy)
    assert served(a, b) == [1, 3]
    parts = [first] + [part async for part in stream]
    assert parts[-1].done and len(parts) == 11
    # Probes keep finding the node healthy; it stays drained.
    cycles = proxy.ctx.monitor.cycles
    await wait_for(lambda: proxy.ctx.monitor.cycles >= cycles + 2, timeout=3)
    assert proxy.node(a).status == "drained" and proxy.node(a).healthy
    answer = await call(proxy, "PATCH", f"/api/proxy/nodes/{a_id}", {"active": True},
                        token=token)
    assert answer.json["active"] is True
    await wait_for(lambda: proxy.node(a).status == "active", timeout=2)


async def test_node_changes_persist_across_a_restart(io_loop, make_node, make_proxy, tmp_path):
    node = await make_node()
    db = str(tmp_path / "nodes.db")
    proxy = await make_proxy(db=db, health_interval=3600)
    token = await login(proxy)
    created = (await call(proxy, "POST", "/api/proxy/nodes",
                          {"address": node.url, "name": "kept"}, token=token)).json
    gone = (await call(proxy, "POST", "/api/proxy/nodes", {"address": "gpu9"},
                       token=token)).json
    await call(proxy, "PATCH", f"/api/proxy/nodes/{created['id']}", {"active": False},
               token=token)
    await call(proxy, "DELETE", f"/api/proxy/nodes/{gone['id']}", token=token)
    await proxy.stop()
    proxy = await make_proxy(db=db, health_interval=3600)
    token = await login(proxy)
    listed = (await call(proxy, "GET", "/api/proxy/nodes", token=token)).json["results"]
    assert listed == [{**created, "active": False}]
    assert proxy.node(node).status == "drained"
    state = json.loads((await call(proxy, "GET", "/api/proxy/state")).text)
    assert state["active"] == [] and state["standby"] == [node.url]


async def test_slots_set_through_the_api_make_requests_queue(io_loop, make_node, make_proxy):
    node = await make_node(chunks=6, chunk_delay=0.1)
    proxy = await make_proxy([node], max_queue=1)
    token = await login(proxy)
    node_id = proxy.node(node).id
    answer = await call(proxy, "PATCH", f"/api/proxy/nodes/{node_id}", {"slots": 1},
                        token=token)
    assert answer.code == 200 and answer.json["slots"] == 1
    assert proxy.node(node).slots == 1  # the router has it at once
    client = ollama.AsyncClient(host=proxy.url)
    first = asyncio.ensure_future(client.generate(model="llama3", prompt="a", stream=False))
    await wait_for(lambda: proxy.node(node).active_requests == 1)
    second = asyncio.ensure_future(client.generate(model="llama3", prompt="b", stream=False))
    await wait_for(lambda: proxy.ctx.scheduler.depth == 1)
    state = (await call(proxy, "GET", "/api/proxy/state")).json
    assert state["queue"]["depth"] == 1 and state["nodes"][0]["slots"] == 1
    # The queue holds one: a third request is turned away, told when to retry.
    with pytest.raises(ollama.ResponseError) as busy:
        await client.generate(model="llama3", prompt="c", stream=False)
    assert busy.value.status_code == 503 and "server busy" in busy.value.error
    third = await call(proxy, "POST", "/api/generate", {"model": "llama3", "prompt": "d"})
    assert third.code == 503 and int(third.headers["Retry-After"]) >= 1
    assert (await first).done and (await second).done
    records = node.requests_to("/api/generate")
    assert [r.json["prompt"] for r in records] == ["a", "b"]
    assert records[1].started_at >= records[0].finished_at  # it waited for the slot


async def test_more_slots_serve_a_waiting_request_at_once(io_loop, make_node, make_proxy):
    node = await make_node(chunks=10, chunk_delay=0.1)
    proxy = await make_proxy([node])
    token = await login(proxy)
    url = f"/api/proxy/nodes/{proxy.node(node).id}"
    await call(proxy, "PATCH", url, {"slots": 1}, token=token)
    client = ollama.AsyncClient(host=proxy.url)
    first = asyncio.ensure_future(client.generate(model="llama3", prompt="a", stream=False))
    await wait_for(lambda: proxy.node(node).active_requests == 1)
    second = asyncio.ensure_future(client.generate(model="llama3", prompt="b", stream=False))
    await wait_for(lambda: proxy.ctx.scheduler.depth == 1)
    answer = await call(proxy, "PATCH", url, {"slots": 2}, token=token)
    assert answer.code == 200 and answer.json["slots"] == 2
    # The waiter leaves the queue without waiting for the first to finish.
    await wait_for(lambda: len(node.requests_to("/api/generate")) == 2, timeout=0.5)
    assert not first.done() and proxy.ctx.scheduler.depth == 0
    await asyncio.gather(first, second)


async def test_weights_set_through_the_api_split_round_robin_3_to_1(io_loop, make_node,
                                                                   make_proxy):
    small, big = await make_node(), await make_node()
    proxy = await make_proxy([small, big])
    token = await login(proxy)
    await call(proxy, "PUT", "/api/proxy/config", {"strategy": "round_robin"}, token=token)
    answer = await call(proxy, "PATCH", f"/api/proxy/nodes/{proxy.node(big).id}",
                        {"weight": 3}, token=token)
    assert answer.code == 200 and answer.json["weight"] == 3.0
    for _ in range(12):
        await generate_on(proxy)
    assert served(small, big) == [3, 9]
    weights = {n["url"]: n["weight"] for n in
               (await call(proxy, "GET", "/api/proxy/state")).json["nodes"]}
    assert weights == {small.url: 1.0, big.url: 3.0}


async def test_bad_slots_or_weight_change_nothing(io_loop, make_node, make_proxy):
    node = await make_node()
    proxy = await make_proxy([node], health_interval=3600)
    token = await login(proxy)
    url = f"/api/proxy/nodes/{proxy.node(node).id}"
    for body in ({"slots": 0}, {"weight": 0}, {"slots": 2, "weight": "heavy"},
                 {"name": "renamed", "slots": 2048}):
        for method in ("PATCH", "PUT"):
            answer = await call(proxy, method, url, {"address": node.url, **body},
                                token=token)
            assert answer.code == 400 and answer.json["error"] == "validation failed", answer
    one = (await call(proxy, "GET", url, token=token)).json
    assert (one["slots"], one["weight"], one["name"]) == (4, 1.0, proxy.node(node).name)
    assert (proxy.node(node).slots, proxy.node(node).weight) == (4, 1.0)
    # A PUT that leaves them out keeps them.
    await call(proxy, "PATCH", url, {"slots": 8, "weight": 0.5}, token=token)
    answer = await call(proxy, "PUT", url, {"address": node.url, "name": "n"}, token=token)
    assert (answer.json["slots"], answer.json["weight"]) == (8, 0.5)


async def test_slots_and_weight_persist_across_a_restart(io_loop, make_node, make_proxy,
                                                        tmp_path):
    node = await make_node()
    db = str(tmp_path / "capacity.db")
    proxy = await make_proxy([node], db=db, health_interval=3600)
    token = await login(proxy)
    node_id = proxy.node(node).id
    created = (await call(proxy, "POST", "/api/proxy/nodes",
                          {"address": "gpu9", "slots": 16, "weight": 2.5}, token=token)).json
    assert (created["slots"], created["weight"]) == (16, 2.5)
    await call(proxy, "PATCH", f"/api/proxy/nodes/{node_id}", {"slots": 1, "weight": 0.25},
               token=token)
    await proxy.stop()
    proxy = await make_proxy([node], db=db, health_interval=3600)
    token = await login(proxy)
    listed = {n["id"]: (n["slots"], n["weight"]) for n in
              (await call(proxy, "GET", "/api/proxy/nodes", token=token)).json["results"]}
    assert listed == {node_id: (1, 0.25), created["id"]: (16, 2.5)}
    assert (proxy.node(node).slots, proxy.node(node).weight) == (1, 0.25)
    views = {n["id"]: (n["slots"], n["weight"]) for n in
             (await call(proxy, "GET", "/api/proxy/state")).json["nodes"]}
    assert views == listed


async def test_nodes_outside_the_node_networks_are_never_connected_to(io_loop, make_node,
                                                                       make_proxy):
    node = await make_node()
    proxy = await make_proxy([node], node_networks=parse_networks("127.0.0.2/32"))
    state = proxy.node(node)
    assert not state.healthy and "outside the allowed node networks" in state.reason
    answer = await call(proxy, "POST", "/api/generate", {"model": "llama3", "prompt": "x"})
    assert answer.code == 404  # never reached, so none of its models is known
    assert node.connections_accepted == 0
