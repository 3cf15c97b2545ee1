"""The public listings (/api/tags, /v1/models, /api/ps): they list a model
exactly when a request for it would be routed, and a node's long list is
merged once, not on every listing."""
from __future__ import annotations

import time

import ollama
import openai

from tests.helpers import call


async def listed(proxy) -> tuple[set[str], set[str], set[str]]:
    """The model names of /api/tags, /v1/models and /api/ps, through the clients."""
    native = ollama.AsyncClient(host=proxy.url)
    tags = {m.model for m in (await native.list()).models}
    ps = {m.model for m in (await native.ps()).models}
    async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused",
                                  max_retries=0) as client:
        models = {m.id for m in (await client.models.list()).data or []}
    return tags, models, ps


async def generate(proxy, model: str) -> None:
    answer = await ollama.AsyncClient(host=proxy.url).generate(model=model, prompt="x",
                                                               stream=False)
    assert answer.done


async def test_a_resting_nodes_models_stay_listed_while_routed_to(io_loop, make_node,
                                                                 make_proxy):
    busy = await make_node(["llama3:latest", "qwen3:8b"])
    calm = await make_node(["llama3:latest"])
    proxy = await make_proxy([busy, calm], health_interval=3600)
    await generate(proxy, "qwen3:8b")  # qwen3 is loaded on the busy node
    busy.fail_status, busy.fail_message = 503, "server busy, please try again."
    try:
        await generate(proxy, "qwen3:8b")
    except ollama.ResponseError as exc:
        assert exc.status_code == 503  # only it has qwen3, and it said busy
    state = proxy.node(busy)
    assert state.resting() and not state.routable  # the moment it starts resting
    tags, models, ps = await listed(proxy)
    assert {"llama3:latest", "qwen3:8b"} == tags == models
    assert ps == {"qwen3:8b"}
    # ... because a request for it is still routed there, as a last resort.
    busy.fail_status = None
    await generate(proxy, "qwen3:8b")
    assert len(busy.requests_to("/api/generate")) == 3 and state.resting()


async def test_an_open_circuits_models_stay_listed_while_routed_to(io_loop, make_node,
                                                                  make_proxy):
    flappy = await make_node(["llama3:latest", "qwen3:8b"])
    steady = await make_node(["llama3:latest"])
    proxy = await make_proxy([flappy, steady], health_interval=3600)
    await generate(proxy, "qwen3:8b")
    state = proxy.node(flappy)
    state.breaker.until = time.monotonic() + 60  # its circuit is open
    assert state.healthy and not state.routable
    tags, models, ps = await listed(proxy)
    assert {"llama3:latest", "qwen3:8b"} == tags == models and ps == {"qwen3:8b"}
    answer = await call(proxy, "GET", "/v1/models/qwen3:8b")
    assert answer.code == 200 and answer.json["id"] == "qwen3:8b"
    await generate(proxy, "qwen3:8b")
    assert len(flappy.requests_to("/api/generate")) == 2
    # While its circuit is open it may not answer listings at all: routing
    # still trusts its last probe, and so does the listing.
    await flappy.stop()
    tags, models, ps = await listed(proxy)
    assert {"llama3:latest", "qwen3:8b"} == tags == models and ps == {"qwen3:8b"}


async def test_models_of_drained_or_unhealthy_nodes_are_not_listed(io_loop, make_node,
                                                                  make_proxy):
    shared = await make_node(["llama3:latest"])
    drained = await make_node(["llama3:latest", "qwen3:8b"])
    down = await make_node(["mistral:7b"])
    proxy = await make_proxy([shared, drained, down], health_interval=3600)
    await generate(proxy, "qwen3:8b")
    await generate(proxy, "mistral:7b")
    assert (await listed(proxy))[0] == {"llama3:latest", "qwen3:8b", "mistral:7b"}
    proxy.ctx.nodes.update(proxy.node(drained).id, {"active": False}, partial=True)
    await down.stop()
    await proxy.probe()
    assert not proxy.node(down).healthy
    tags, models, ps = await listed(proxy)
    assert tags == models == {"llama3:latest"} and ps == set()
    for model in ("qwen3:8b", "mistral:7b"):  # not listed: not routed either
        answer = await call(proxy, "POST", "/api/generate", {"model": model, "prompt": "x"})
        assert answer.code == 503, (model, answer)
        assert (await call(proxy, "GET", f"/v1/models/{model}")).code == 404


async def test_a_long_listing_is_merged_once_until_a_node_changes_it(io_loop, make_node,
                                                                     make_proxy):
    names = [f"model{i}:latest" for i in range(10_000)]
    big = await make_node(names)
    small = await make_node(["llama3:latest"])
    # The test node builds its long answer on this loop: time to spare.
    proxy = await make_proxy([big, small], health_interval=3600, probe_timeout=15.0)
    listings = proxy.ctx.listings
    assert proxy.node(big).healthy and proxy.node(small).healthy
    first = await call(proxy, "GET", "/api/tags")
    merges = listings.merges
    second = await call(proxy, "GET", "/api/tags")
    assert first.code == second.code == 200 and first.text == second.text
    assert len(first.json["models"]) == 10_001
    openai_list = await call(proxy, "GET", "/v1/models")
    assert len(openai_list.json["data"]) == 10_001
    assert (await call(proxy, "GET", "/v1/models/model9999")).json["id"] == "model9999"
    assert listings.merges == merges  # nothing was merged again
    # A change on a node shows at once.
    big.models[0] = "fresh:latest"  # model0 deleted, fresh pulled
    third = {m["name"] for m in (await call(proxy, "GET", "/api/tags")).json["models"]}
    assert len(third) == 10_001 and "fresh:latest" in third and "model0:latest" not in third
    openai_ids = {m["id"] for m in (await call(proxy, "GET", "/v1/models")).json["data"]}
    assert openai_ids == third
    assert (await call(proxy, "GET", "/v1/models/model0")).code == 404
    assert listings.merges == merges + 1
    # So does a node leaving the listing.
    proxy.ctx.nodes.update(proxy.node(big).id, {"active": False}, partial=True)
    assert [m["name"] for m in (await call(proxy, "GET", "/api/tags")).json["models"]] == [
        "llama3:latest"]
