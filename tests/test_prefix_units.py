"""The prefix memory and the cache_aware strategy, without HTTP."""
from __future__ import annotations

from aivonx import bodyscan, prefix
from aivonx.prefix import BLOCK_CHARS, PrefixMemory, RoutingHint, routing_hint
from aivonx.modelnames import canonical
from aivonx.registry import Registry
from aivonx.router import Router, within_bound

KEY = canonical("m")
SYSTEM = "You are a helpful assistant. " * 200   # ~5,800 characters: several blocks


def chat(*turns: str, system: str = SYSTEM) -> dict:
    messages = [{"role": "system", "content": system}]
    for i, text in enumerate(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return {"model": "m", "messages": messages}


def hint(body: dict, headers: dict | None = None) -> RoutingHint:
    return routing_hint(KEY, body, headers or {})


def cluster(count: int = 3) -> tuple[Registry, Router]:
    registry = Registry()
    for i in range(1, count + 1):
        state = registry.upsert(i, f"n{i}", "127.0.0.1", 11000 + i, True, ["m:latest"])
        state.healthy = True
    return registry, Router(registry, "cache_aware")


def route(router: Router, h: RoutingHint, hold: bool = False) -> tuple[int, str]:
    """One request as the scheduler serves it: the first candidate, chosen(),
    and (unless `hold`) its end, which frees the node's cache slot."""
    node = router.candidates(KEY, hint=h)[0]
    why, cached = router.chosen(node, KEY, h)
    if not hold:
        router.prefixes.release(cached)
    return node.id, why


def test_a_follow_up_turn_extends_the_previous_turns_blocks():
    first = hint(chat("question " * 300))
    second = hint(chat("question " * 300, "answer " * 50, "again " * 80))
    assert len(first.blocks) >= 5
    assert second.blocks[:len(first.blocks)] == first.blocks
    other_tenant = hint(chat("question " * 300, system="Another assistant. " * 300))
    assert not set(other_tenant.blocks) & set(first.blocks)
    other_model = routing_hint(canonical("n"), chat("question " * 300), {})
    assert not set(other_model.blocks) & set(first.blocks)


def test_only_the_leading_part_is_hashed():
    huge = hint({"model": "m", "prompt": "x" * (prefix.MAX_PREFIX_CHARS * 8)})
    assert len(huge.blocks) == prefix.MAX_PREFIX_CHARS // BLOCK_CHARS
    assert hint({"model": "m", "prompt": "short"}).blocks == ()


def test_generate_system_and_anthropic_blocks_and_large_values_are_read():
    generate = hint({"model": "m", "system": SYSTEM, "prompt": "hello"})
    messages = hint({"model": "m", "system": [{"type": "text", "text": SYSTEM}],
                     "messages": [{"role": "user", "content": [{"type": "text",
                                                                "text": "hello"}]}]})
    assert generate.blocks and messages.blocks
    assert generate.blocks[0] == messages.blocks[0]  # the system prompt leads both
    raw = b'{"model": "m", "prompt": "' + b"y" * 100_000 + b'"}'
    scanned = bodyscan.scan_all(raw)
    assert isinstance(scanned["prompt"], bodyscan.Large)
    assert len(routing_hint(KEY, scanned, {}, raw).blocks) == prefix.MAX_PREFIX_CHARS // BLOCK_CHARS


def test_an_explicit_session_key_wins_header_first():
    body = {**chat("hi " * 400), "user": "alice"}
    assert hint(body).session == hint({**chat("other " * 400), "user": "alice"}).session
    assert hint(body, {prefix.SESSION_HEADER: "s1"}).session != hint(body).session
    assert hint(chat("hi")).session is None
    assert hint({**chat("hi"), "prompt_cache_key": "k"}).session is not None


def test_memory_bounds_entries_and_bytes_evicting_the_oldest():
    memory = PrefixMemory(max_entries=10)
    old = RoutingHint(blocks=tuple(range(100, 108)))
    new = RoutingHint(blocks=tuple(range(200, 208)))
    memory.release(memory.record(1, "m", old))
    memory.release(memory.record(2, "m", new))
    assert len(memory) == 10
    assert memory.matches(new) == {2: (8, memory.entries[207].nodes[2])}
    assert memory.matches(old) == {}  # its first blocks went first: the chain is cut
    assert memory.evicted == 6
    small = PrefixMemory(max_bytes=5 * (prefix.ENTRY_BYTES + prefix.NODE_BYTES))
    small.record(1, "m", new)
    assert len(small) == 5 and small.bytes <= small.max_bytes


def test_memory_forgets_a_node_per_model_or_entirely():
    memory = PrefixMemory()
    a = RoutingHint(blocks=(1, 2, 3))
    b = RoutingHint(blocks=(7, 8))
    for node, model, prompt in ((1, "m", a), (2, "m", a), (1, "other", b)):
        memory.release(memory.record(node, model, prompt))
    assert memory.forget(1, {"m"}) == 3
    assert set(memory.matches(a)) == {2}
    assert set(memory.matches(b)) == {1}
    assert memory.forget(1) == 2
    assert memory.matches(b) == {}
    memory.forget(2)
    assert len(memory) == 0 and memory.bytes == 0 and memory.owned == {}


def test_a_conversation_sticks_to_its_node_and_conversations_spread():
    registry, router = cluster(3)
    homes = {}
    for turn in range(4):
        for conv in range(6):
            history = [f"conversation {conv} turn {t} " * 60 for t in range(turn + 1)]
            node, why = route(router, hint(chat(*history, system=f"tenant {conv} " * 400)))
            assert homes.setdefault(conv, node) == node
            if turn:
                assert why == "prefix"
    assert len(set(homes.values())) == 3


def test_a_node_above_the_load_bound_is_skipped():
    registry, router = cluster(3)
    body = chat("hello " * 400)
    home, _ = route(router, hint(body))
    registry.nodes[home].active_requests = 3  # 3 + 1 is above 1.25 x (3 + 1) / 3
    router.load_factor = 4.0
    assert route(router, hint(body)) == (home, "prefix")
    router.load_factor = 1.25
    node, why = route(router, hint(body))
    assert node != home and why != "prefix"
    assert within_bound(list(registry.nodes.values()), 1.25) == {
        n for n in registry.nodes if n != home}


def test_a_node_that_unloads_the_model_or_restarts_loses_its_affinity():
    registry, router = cluster(2)
    body = chat("hello " * 400)
    loaded = [{"model": "m:latest"}]
    home, _ = route(router, hint(body))
    registry.set_loaded(registry.nodes[home], loaded)
    assert route(router, hint(body)) == (home, "prefix")
    registry.set_loaded(registry.nodes[home], [])
    assert router.prefixes.matches(hint(body)) == {}
    home, _ = route(router, hint(body))
    registry.mark_down(registry.nodes[home], "gone")
    registry.mark_up(registry.nodes[home])
    assert router.prefixes.matches(hint(body)) == {}


def test_the_session_node_wins_over_a_deeper_prefix_elsewhere():
    registry, router = cluster(2)
    body = chat("hello " * 400)
    prefix_home, _ = route(router, hint(body))
    session = hint({**body, "messages": body["messages"][:1] + [{"role": "user",
                                                                 "content": "other"}]},
                   {prefix.SESSION_HEADER: "abc"})
    other = next(n for n in registry.nodes if n != prefix_home)
    router.prefixes.release(router.chosen(registry.nodes[other], KEY, session)[1])
    with_session = hint(body, {prefix.SESSION_HEADER: "abc"})
    assert route(router, with_session) == (other, "session")
    assert router.affinity()["hits"] >= 1


def test_without_history_warm_nodes_come_first():
    registry, router = cluster(3)
    registry.set_loaded(registry.nodes[2], [{"model": "m:latest"}])
    assert route(router, hint(chat("fresh " * 400))) == (2, "warm")
    registry.set_loaded(registry.nodes[2], [])
    node, why = route(router, hint(chat("another " * 400)))
    assert why == "least_active"


def test_a_node_holds_only_as_many_prompts_as_it_has_slots():
    memory = PrefixMemory()
    shared = (1, 2)
    prompts = [RoutingHint(blocks=shared + (10 * i,)) for i in range(1, 4)]
    for prompt in prompts:
        memory.release(memory.record(1, "m", prompt, capacity=2))
    assert memory.matches(prompts[0]) == {1: (2, memory.entries[2].nodes[1])}  # shared only
    assert memory.matches(prompts[2])[1][0] == 3
    for other in (7, 8):
        memory.release(memory.record(1, "m", RoutingHint(blocks=(other,)), capacity=2))
    assert memory.matches(prompts[2]) == {}  # evicted from both of its slots


def test_a_new_prompt_overwrites_the_least_recently_used_free_slot():
    memory = PrefixMemory()
    tenant = RoutingHint(blocks=(1, 2, 3))
    other = RoutingHint(blocks=(9,))
    memory.release(memory.record(1, "m", tenant, capacity=2))
    memory.release(memory.record(1, "m", other, capacity=2))
    using = memory.record(1, "m", RoutingHint(blocks=(1, 2, 3, 4)), capacity=2)
    assert memory.matches(RoutingHint(blocks=(9, 10)))[1][0] == 1  # the continuation took the tenant slot
    memory.record(1, "m", RoutingHint(blocks=(50,)), capacity=2)
    assert memory.matches(other) == {}  # the only free slot went to the new prompt
    assert memory.matches(RoutingHint(blocks=(1, 2, 3, 4, 5)))[1][0] == 4  # in use, held
    memory.release(using)


def test_a_prompt_cached_nowhere_avoids_evicting_a_nodes_only_copy_of_another():
    for turn in range(4):
        registry, router = cluster(2)
        for state in registry.nodes.values():
            state.slots = 1
        for _ in range(turn):
            router.next_turn()
        home, _ = route(router, hint(chat("hello", system="tenant a " * 400)))
        if turn % 2:
            router.next_turn()  # least_active's rotation would pick home again
        other, why = route(router, hint(chat("hello", system="tenant b " * 400)))
        assert other != home and why == "least_active"
        assert router.prefixes.evicts(home, KEY, hint(chat("x", system="c " * 900)), 1)


def test_a_tenant_evicted_everywhere_goes_back_to_its_last_home():
    registry, router = cluster(3)
    for state in registry.nodes.values():
        state.slots = 1
    home, _ = route(router, hint(chat("hello", system="tenant a " * 400)))
    # Another tenant takes the home's only slot: tenant a is cached nowhere now.
    router.prefixes.release(router.chosen(registry.nodes[home], KEY,
                                          hint(chat("x", system="tenant b " * 400)))[1])
    again = hint(chat("next", system="tenant a " * 400))
    assert router.prefixes.matches(again) == {}
    assert router.prefixes.home(again) == home
    # Every node would lose its only copy of someone else, the home too; it comes first.
    for node in registry.nodes:
        if node != home:
            router.prefixes.release(router.chosen(registry.nodes[node], KEY, hint(
                chat("y", system=f"tenant {node} " * 400)))[1])
    assert route(router, again)[0] == home


def test_a_new_tenant_goes_where_fewest_other_prompts_are_cached():
    registry, router = cluster(2)
    crowded, _ = route(router, hint(chat("one", system="tenant a " * 400)))
    other = next(n for n in registry.nodes if n != crowded)
    router.prefixes.release(router.chosen(registry.nodes[crowded], KEY,
                                          hint(chat("two", system="tenant b " * 400)))[1])
    assert router.prefixes.families(crowded, KEY) == 2
    assert route(router, hint(chat("three", system="tenant c " * 400)))[0] == other
