"""Router strategies and catalog merges, without HTTP."""
from __future__ import annotations

import pytest

from aivonx import catalog
from aivonx.registry import Registry
from aivonx.router import NoHealthyNode, NoSuchModel, Router
from aivonx.modelnames import canonical


def registry_with(*specs):
    registry = Registry()
    for i, (models, healthy) in enumerate(specs, start=1):
        state = registry.upsert(i, f"n{i}", "127.0.0.1", 11000 + i, True, models)
        state.healthy = healthy
    return registry


def test_candidates_only_nodes_with_the_model_that_are_up():
    registry = registry_with((["llama3:latest"], True), (["qwen3:8b"], True),
                             (["llama3:latest"], False))
    router = Router(registry)
    assert [n.id for n in router.candidates(canonical("LLAMA3"))] == [1]
    with pytest.raises(NoSuchModel):
        router.candidates(canonical("mistral"))
    registry.nodes[1].healthy = False
    with pytest.raises(NoHealthyNode):
        router.candidates(canonical("llama3"))


def test_drained_node_is_never_a_candidate():
    registry = registry_with((["llama3:latest"], True), (["llama3:latest"], True))
    registry.set_enabled(registry.nodes[1], False)
    router = Router(registry)
    assert {n.id for _ in range(5) for n in router.candidates(canonical("llama3"))} == {2}


def test_least_active_prefers_idle_and_rotates_ties():
    registry = registry_with(*[(["m:latest"], True)] * 3)
    router = Router(registry)
    firsts = [router.candidates(canonical("m"))[0].id for _ in range(6)]
    assert sorted(firsts) == [1, 1, 2, 2, 3, 3]
    registry.nodes[1].active_requests = 2
    registry.nodes[2].active_requests = 1
    assert [n.id for n in router.candidates(canonical("m"))] == [3, 2, 1]


def test_lowest_latency_uses_the_smoothed_latency():
    registry = registry_with(*[(["m:latest"], True)] * 2)
    router = Router(registry, "lowest_latency")
    for sample in (0.010, 0.011, 0.012):
        registry.record_latency(registry.nodes[1], sample)
    for sample in (0.005, 0.005, 0.200):  # one bad sample does not flip it
        registry.record_latency(registry.nodes[2], sample)
    assert registry.nodes[2].latency > registry.nodes[1].latency
    assert router.candidates(canonical("m"))[0].id == 1


def test_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="least_active"):
        Router(Registry(), "fastest")


def test_merge_tags_dedupes_and_newest_wins():
    a = [{"name": "llama3:latest", "model": "llama3:latest",
          "modified_at": "2025-05-04T17:37:44.706015396-07:00", "digest": "old"}]
    b = [{"name": "llama3:latest", "model": "llama3:latest",
          "modified_at": "2025-05-05T01:00:00.1+00:00", "digest": "new"},
         {"name": "qwen3:8b", "model": "qwen3:8b", "modified_at": "bogus"}]
    merged = catalog.merge_tags([a, b])
    assert [e["digest"] for e in merged if e["model"] == "llama3:latest"] == ["new"]
    assert len(merged) == 2


def test_lowest_version_and_openai_list():
    assert catalog.lowest_version(["0.12.3", "0.9.10", None, "garbage"]) == "0.9.10"
    assert catalog.lowest_version([]) == "0.0.0"
    assert catalog.openai_model_list([]) == {"object": "list", "data": None}
    listed = catalog.openai_model_list([{"model": "user/m:tag",
                                         "modified_at": "2024-01-01T00:00:00Z"}])
    assert listed["data"] == [{"id": "user/m:tag", "object": "model",
                               "created": 1704067200, "owned_by": "user"}]


def test_health_states_say_why():
    registry = Registry()
    node = registry.upsert(1, "n", "h", 11434, True)
    assert (node.health, node.health_reason) == ("unhealthy", "not probed yet")
    registry.mark_up(node)
    assert (node.health, node.health_reason) == ("healthy", "")
    registry.record_latency(node, 2.5)
    assert (node.health, node.health_reason) == ("degraded", "slow: probes take 2.50 s")
    node.latency = 0.01
    registry.transport_failed(node, "connection reset")
    assert node.health == "degraded"
    assert node.health_reason.startswith("a request failed") and node.routable
    registry.busy(node, 30)
    assert (node.health, node.health_reason) == ("degraded", "busy: resting 30 s")
    assert not node.routable
    node.cooldown_until = 0.0  # the rest is over
    registry.mark_down(node, "connection refused")
    assert (node.health, node.health_reason) == ("unhealthy", "connection refused")
    registry.set_enabled(node, False)
    assert (node.health, node.health_reason) == ("drained", "drained by admin")
    registry.mark_up(node)  # a drained node that answers: still drained, by the admin
    assert (node.health, node.health_reason) == ("drained", "drained by admin")
