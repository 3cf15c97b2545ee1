"""cache_aware routing through real HTTP: conversations stick to the node
that holds their prompt, within the load bound, and lose that affinity
when the node loses its cache."""
from __future__ import annotations

import asyncio

import openai

from tests.helpers import call, login
from tests.fakes.prefix_cache import PrefixCache


def conversation(tenant: int, conv: int, turns: int) -> list[dict]:
    """A chat history: the tenant's system prompt, then turns of its own."""
    messages = [{"role": "system", "content": f"You serve tenant {tenant}. " * 300}]
    for turn in range(turns):
        messages.append({"role": "user", "content": f"conv {conv} question {turn} " * 40})
        if turn < turns - 1:
            messages.append({"role": "assistant", "content": f"answer {turn} " * 20})
    return messages


async def chat(proxy, messages, headers=None):
    answer = await call(proxy, "POST", "/api/chat", {"model": "llama3", "messages": messages,
                                                     "stream": False}, headers=headers)
    assert answer.code == 200, answer
    return answer.headers["X-Aivonx-Node"], answer.headers["X-Aivonx-Route"]


async def cluster(make_node, make_proxy, count=3, **settings):
    nodes = [await make_node() for _ in range(count)]
    for node in nodes:
        node.prefix_cache = PrefixCache(per_token=0.0, base=0.0)
    proxy = await make_proxy(nodes, **settings)
    proxy.ctx.nodes.set_strategy("cache_aware")
    return nodes, proxy


async def test_turns_of_a_conversation_stay_on_one_node_while_conversations_spread(
        make_node, make_proxy):
    nodes, proxy = await cluster(make_node, make_proxy)
    homes: dict[int, str] = {}
    for turns in range(1, 5):
        for conv in range(6):
            node, route = await chat(proxy, conversation(conv, conv, turns))
            assert homes.setdefault(conv, node) == node
            assert route == ("prefix" if turns > 1 else route)
    assert len(set(homes.values())) == 3
    # The nodes saw it too: every later turn reused the cached conversation.
    assert sum(n.prefix_cache.hits for n in nodes) >= 6 * 3
    metrics = (await call(proxy, "GET", "/metrics")).text
    assert 'aivonx_cache_affinity_total{result="hit"} 18' in metrics
    assert 'aivonx_cache_affinity_total{result="miss"} 6' in metrics
    state = (await call(proxy, "GET", "/api/proxy/state")).json
    assert state["cache_affinity"]["hit_rate"] == 0.75
    assert state["display"]["cache_hit_rate"] == "75% cache hits"


async def test_a_node_at_its_load_bound_is_skipped(make_node, make_proxy):
    nodes, proxy = await cluster(make_node, make_proxy, count=3)
    home, _ = await chat(proxy, conversation(1, 1, 1))
    busy = next(n for n in nodes if proxy.node(n).name == home)
    busy.chunk_delay = 5.0  # streams on it stay open
    # 3 in flight there, none elsewhere: a 4th is above ceil(1.25 x 4 / 3) + 1.
    holders = [asyncio.ensure_future(call(proxy, "POST", "/api/chat", {
        "model": "llama3", "messages": conversation(1, 1, 2)})) for _ in range(3)]
    while proxy.node(busy).active_requests < 3:
        await asyncio.sleep(0.01)
    node, route = await chat(proxy, conversation(1, 1, 2))
    assert node != home and route != "prefix"
    busy.chunk_delay = 0.0
    for holder in holders:
        holder.cancel()


async def test_a_node_that_unloads_the_model_loses_its_affinity(make_node, make_proxy):
    nodes, proxy = await cluster(make_node, make_proxy, count=2)
    home, _ = await chat(proxy, conversation(1, 1, 1))
    await proxy.probe()  # /api/ps now shows the model loaded there
    assert (await chat(proxy, conversation(1, 1, 2))) == (home, "prefix")
    node = next(n for n in nodes if proxy.node(n).name == home)
    answer = await call(proxy, "POST", "/api/generate", {"model": "llama3", "keep_alive": 0})
    assert answer.code == 200 and node.loaded == []
    await proxy.probe()
    _, route = await chat(proxy, conversation(1, 1, 3))
    assert route != "prefix"


async def test_an_explicit_session_wins_over_the_prompt(make_node, make_proxy):
    nodes, proxy = await cluster(make_node, make_proxy, count=2)
    prefix_home, _ = await chat(proxy, conversation(1, 1, 1))
    holder = next(n for n in nodes if proxy.node(n).name == prefix_home)
    # The session starts on the other node (the prompt's node is drained meanwhile)...
    proxy.registry.set_enabled(proxy.node(holder), False)
    session_home, _ = await chat(proxy, conversation(2, 2, 1), {"X-Aivonx-Session": "s-42"})
    proxy.registry.set_enabled(proxy.node(holder), True)
    assert session_home != prefix_home
    # ...and keeps it, even with a prompt the first node holds: the client said
    # which conversation this is.
    node, route = await chat(proxy, conversation(1, 1, 2), {"X-Aivonx-Session": "s-42"})
    assert (node, route) == (session_home, "session")


async def test_openai_clients_route_by_prefix_and_by_user(make_node, make_proxy):
    nodes, proxy = await cluster(make_node, make_proxy, count=3)
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
    try:
        homes = set()
        for turns in (1, 2, 3):
            raw = await client.chat.completions.with_raw_response.create(
                model="llama3", messages=conversation(7, 7, turns))
            homes.add(raw.headers["x-aivonx-node"])
            if turns > 1:
                assert raw.headers["x-aivonx-route"] == "prefix"
        assert len(homes) == 1
        raw = await client.chat.completions.with_raw_response.create(
            model="llama3", messages=[{"role": "user", "content": "hi"}], user="u1")
        again = await client.chat.completions.with_raw_response.create(
            model="llama3", messages=[{"role": "user", "content": "other"}], user="u1")
        assert again.headers["x-aivonx-route"] == "session"
        assert again.headers["x-aivonx-node"] == raw.headers["x-aivonx-node"]
    finally:
        await client.close()


async def test_the_load_factor_is_a_kept_setting(make_node, make_proxy, tmp_path):
    node = await make_node()
    db = str(tmp_path / "factor.db")
    proxy = await make_proxy([node], db=db)
    token = await login(proxy)
    answer = await call(proxy, "PATCH", "/api/proxy/config", {"cache_load_factor": 2}, token)
    assert answer.code == 200 and answer.json["cache_load_factor"] == 2
    assert "cache_aware" in answer.json["strategies"]
    bad = await call(proxy, "PATCH", "/api/proxy/config", {"cache_load_factor": 0.5}, token)
    assert bad.code == 400
    await proxy.stop()
    again = await make_proxy([node], db=db)
    assert again.ctx.router.load_factor == 2.0


async def test_other_strategies_name_themselves(make_node, make_proxy):
    node = await make_node()
    proxy = await make_proxy([node])
    answer = await call(proxy, "POST", "/api/chat", {
        "model": "llama3", "messages": conversation(1, 1, 1), "stream": False})
    assert answer.headers["X-Aivonx-Route"] == "least_active"
