"""Several instances as one: two Aivonx on one PostgreSQL and one Redis, in
front of test nodes that record every request's start and end."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import ollama
from tornado.httpclient import AsyncHTTPClient

from aivonx.cluster.leases import LEASE_TTL_MS, Leases
from aivonx.cluster.service import HEARTBEAT
from aivonx.cluster.wakeups import WANTED_FOR
from tests.helpers import call, configure, login, overlap, start_aivonx, wait_for


async def pair(make_proxy, nodes, postgres_url, redis_url, **options):
    """Instances a and b on one database and one Redis."""
    a = await make_proxy(nodes, db=postgres_url, redis=redis_url, instance_name="a", **options)
    b = await make_proxy(db=postgres_url, redis=redis_url, instance_name="b", **options)
    await wait_for(lambda: all(len(p.ctx.cluster.instances) == 2 for p in (a, b)), 5)
    return a, b


async def generate(proxy, prompt: str = "hi"):
    return await ollama.AsyncClient(host=proxy.url).generate(model="llama3", prompt=prompt,
                                                             stream=False)


async def state(proxy) -> dict:
    return json.loads((await AsyncHTTPClient().fetch(proxy.url + "/api/proxy/state")).body)


async def test_a_node_of_two_slots_serves_two_at_once_over_both_instances(
        io_loop, make_node, make_proxy, postgres_url, redis_url):
    fake = await make_node(chunks=4, chunk_delay=0.05)
    a, b = await pair(make_proxy, [fake], postgres_url, redis_url)
    configure(a, fake, slots=2)
    await wait_for(lambda: b.node(fake).slots == 2, 1.0)
    results = await asyncio.gather(*(generate(a if i % 2 else b, f"p{i}") for i in range(20)))
    assert all(r.done for r in results)
    records = fake.requests_to("/api/generate")
    assert len(records) == 20 and overlap(records) == 2
    assert a.ctx.scheduler.queued_total and b.ctx.scheduler.queued_total  # both had to wait
    shown = await state(a)
    assert shown["instance"] == "a"
    assert shown["cluster"]["redis"] == "connected" and shown["cluster"]["instances"] == ["a", "b"]


async def test_a_change_through_one_instance_reaches_the_other_within_a_second(
        io_loop, make_node, make_proxy, postgres_url, redis_url):
    first = await make_node()
    second = await make_node(models=["qwen3:latest"])
    a, b = await pair(make_proxy, [first], postgres_url, redis_url)
    token = await login(a)
    added = await call(a, "POST", "/api/proxy/nodes", {"address": second.url}, token=token)
    assert added.code == 201
    await wait_for(lambda: added.json["id"] in b.registry.nodes, 1.0)
    await wait_for(lambda: b.node(second).routable, 1.0)
    answer = await ollama.AsyncClient(host=b.url).generate(model="qwen3", prompt="hi",
                                                           stream=False)
    assert answer.done and second.requests_to("/api/generate")

    drained = await call(a, "PATCH", f"/api/proxy/nodes/{added.json['id']}", {"active": False},
                         token=token)
    assert drained.code == 200
    await wait_for(lambda: not b.node(second).enabled, 1.0)
    strategy = await call(a, "PATCH", "/api/proxy/config",
                          {"strategy": "round_robin", "keep_alive": {"default": "7m"},
                           "cache_load_factor": 3}, token=token)
    assert strategy.code == 200
    await wait_for(lambda: b.ctx.router.strategy == "round_robin"
                   and b.ctx.keep_alive.as_dict()["default"] == "7m"
                   and b.ctx.router.load_factor == 3, 1.0)
    deleted = await call(a, "DELETE", f"/api/proxy/nodes/{added.json['id']}", token=token)
    assert deleted.code == 204
    await wait_for(lambda: added.json["id"] not in b.registry.nodes, 1.0)
    # A login ended through a is refused by b at once: tokens are read from the store.
    assert (await call(b, "GET", "/api/proxy/nodes", token=token)).code == 200
    assert (await call(a, "POST", "/api/account/logout", token=token)).code == 200
    assert (await call(b, "GET", "/api/proxy/nodes", token=token)).code == 401


async def test_leases_of_an_instance_killed_with_9_lapse_within_the_lease_time(
        io_loop, make_node, make_proxy, postgres_url, redis_url):
    fake = await make_node(chunks=200, chunk_delay=0.05)  # ten seconds a request
    b = await make_proxy([fake], db=postgres_url, redis=redis_url, instance_name="b")
    configure(b, fake, slots=2)
    a = await start_aivonx("--db", postgres_url, "--redis", redis_url, "--instance-name", "a")
    client = ollama.AsyncClient(host=a.url)
    held = [asyncio.ensure_future(client.generate(model="llama3", prompt=f"held {i}",
                                                  stream=False)) for i in range(2)]
    try:
        await wait_for(lambda: len(fake.requests_to("/api/generate")) == 2, 10)
        fake.chunks = 2  # for the requests from now on
        waiting = asyncio.ensure_future(generate(b, "after"))
        await wait_for(lambda: b.ctx.scheduler.depth == 1, 5)
        assert len(fake.requests_to("/api/generate")) == 2  # a holds both slots
        os.kill(a.proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        assert (await asyncio.wait_for(waiting, 10)).done
        served = next(r for r in fake.requests if r.json and r.json.get("prompt") == "after")
        assert killed < served.started_at <= killed + LEASE_TTL_MS / 1000 + 1.5
    finally:
        for request in held:
            request.cancel()
        await asyncio.gather(*held, return_exceptions=True)
        await a.stop()


async def test_redis_stopped_and_restarted_under_load_loses_no_request(
        io_loop, make_node, make_proxy, postgres_url, redis_server, redis_url):
    fake = await make_node(chunks=3, chunk_delay=0.03)
    a, b = await pair(make_proxy, [fake], postgres_url, redis_url)
    configure(a, fake, slots=2)
    await wait_for(lambda: b.node(fake).slots == 2, 1.0)
    done: list = []
    stop = asyncio.Event()

    async def load(proxy, name: str) -> None:
        i = 0
        while not stop.is_set():
            done.append(await generate(proxy, f"{name}{i}"))
            i += 1

    clients = [asyncio.ensure_future(load(p, f"{p.ctx.instance}{k}"))
               for p in (a, b) for k in range(3)]
    await wait_for(lambda: len(done) >= 10, 10)
    redis_server.stop()
    await wait_for(lambda: not a.ctx.cluster.connected and not b.ctx.cluster.connected, 5)
    during = len(done)
    await wait_for(lambda: len(done) >= during + 10, 10)  # served on local shares
    shown = await state(a)
    assert shown["cluster"]["redis"] == "unreachable" and not shown["cluster"]["shared_slots"]
    metrics = (await AsyncHTTPClient().fetch(a.url + "/metrics")).body.decode()
    assert "aivonx_redis_connected 0" in metrics
    redis_server.start()
    await wait_for(lambda: a.ctx.cluster.connected and b.ctx.cluster.connected, 5)
    # Switching between shared and local counting may briefly let a node's
    # slots be exceeded (an instance cannot know what the others hold);
    # once both have told Redis their leases again, they hold exactly.
    await asyncio.sleep(HEARTBEAT * 1.5)
    exact_from = time.monotonic()
    leases = Leases(a.ctx.cluster.redis, "test")
    node_id = a.node(fake).id
    counted: list[int] = []

    async def watch() -> None:
        while len(counted) < 50:
            counted.append(await leases.count(f"slots:{node_id}"))
            await asyncio.sleep(0.01)

    await watch()
    stop.set()
    await asyncio.gather(*clients)
    assert all(r.done for r in done)
    records = fake.requests_to("/api/generate")
    assert len(records) == len(done)  # every request served once: none lost
    assert max(counted) >= 1          # counted in Redis again
    shared_again = [r for r in records if (r.finished_at or 0) >= exact_from]
    assert len(shared_again) >= 10 and overlap(shared_again) <= 2


async def test_a_node_failing_through_one_instance_leaves_the_others_pool_within_a_second(
        io_loop, make_node, make_proxy, postgres_url, redis_url):
    failing, spare = await make_node(), await make_node()
    a = await make_proxy([failing, spare], db=postgres_url, redis=redis_url, instance_name="a",
                         health_interval=60)
    b = await make_proxy(db=postgres_url, redis=redis_url, instance_name="b",
                         health_interval=60)
    await wait_for(lambda: all(len(p.ctx.cluster.instances) == 2 for p in (a, b)), 5)
    assert b.node(failing).routable and b.node(spare).routable
    await failing.stop()
    for i in range(4):  # whichever node a picks first, the request is served
        assert (await generate(a, f"p{i}")).done
    assert not a.node(failing).routable  # a found out by sending to it
    await wait_for(lambda: not b.node(failing).routable, 1.0)
    assert b.node(failing).reason == a.node(failing).reason
    assert b.node(spare).routable
    answer = await generate(b, "after")
    assert answer.done and spare.requests_to("/api/generate")[-1].json["prompt"] == "after"


async def test_a_model_seen_by_one_instances_probe_is_routable_through_the_other(
        io_loop, make_node, make_proxy, postgres_url, redis_url):
    fake = await make_node()
    a = await make_proxy([fake], db=postgres_url, redis=redis_url, instance_name="a")
    b = await make_proxy(db=postgres_url, redis=redis_url, instance_name="b",
                         health_interval=60)
    await wait_for(lambda: all(len(p.ctx.cluster.instances) == 2 for p in (a, b)), 5)
    assert "qwen3:latest" not in b.node(fake).models.values()
    fake.models.append("qwen3:latest")
    await wait_for(lambda: "qwen3:latest" in b.node(fake).models.values(), 1.5)
    answer = await ollama.AsyncClient(host=b.url).generate(model="qwen3", prompt="hi",
                                                           stream=False)
    assert answer.done and fake.requests_to("/api/generate")[-1].json["model"] == "qwen3"


async def test_a_malformed_health_message_changes_nothing(
        io_loop, make_node, make_proxy, postgres_url, redis_url):
    fake = await make_node()
    a, b = await pair(make_proxy, [fake], postgres_url, redis_url, health_interval=60)
    node = b.node(fake)
    good = {"from": "a", "kind": "health", "node": node.id, "url": node.url, "healthy": False,
            "reason": "down", "breaker_for": 0, "rest_for": 0, "models": ["llama3:latest"],
            "loaded": []}
    bad = [dict(good, healthy="no"), dict(good, node=True), dict(good, breaker_for=-1),
           dict(good, models=["x"] * 2000), dict(good, loaded="llama3"),
           dict(good, url="http://127.0.0.1:1"), dict(good, rest_for=float("nan"))]
    for message in bad:
        await a.ctx.cluster.redis.publish("aivonx:live", json.dumps(message))
    await a.ctx.cluster.redis.publish("aivonx:live", b"\xff not json")
    await a.ctx.cluster.redis.publish("aivonx:live", json.dumps(dict(good, healthy=True,
                                                                     reason="marker")))
    await wait_for(lambda: node.reason == "marker", 1.0)
    assert node.routable and "llama3:latest" in node.models.values()


async def test_a_slot_freed_on_one_instance_wakes_the_request_waiting_on_the_other(
        io_loop, make_node, make_proxy, postgres_url, redis_url):
    fake = await make_node(chunks=10, chunk_delay=0.1)
    a, b = await pair(make_proxy, [fake], postgres_url, redis_url)
    configure(a, fake, slots=1)
    await wait_for(lambda: b.node(fake).slots == 1, 1.0)
    assert (a.ctx.scheduler.shared.wakeups.sent, b.ctx.scheduler.shared.wakeups.sent) == (0, 0)
    slow = asyncio.ensure_future(generate(b, "slow"))
    await wait_for(lambda: len(fake.requests_to("/api/generate")) == 1, 5)
    fake.chunks = 1
    queued = asyncio.ensure_future(generate(a, "queued"))
    await wait_for(lambda: a.ctx.scheduler.depth == 1, 5)
    assert (await slow).done and (await queued).done
    first, second = fake.requests_to("/api/generate")
    assert first.json["prompt"] == "slow" and second.json["prompt"] == "queued"
    assert first.finished_at <= second.started_at
    assert a.ctx.scheduler.shared.wakeups.woken >= 1  # told by b, not found by polling
    # With no one waiting, ending a request sends nothing.
    sent = a.ctx.scheduler.shared.wakeups.sent + b.ctx.scheduler.shared.wakeups.sent
    await asyncio.sleep(WANTED_FOR + 0.5)  # the "waiting" notice lapses
    for proxy in (a, b, a):
        assert (await generate(proxy, "alone")).done
    assert a.ctx.scheduler.shared.wakeups.sent + b.ctx.scheduler.shared.wakeups.sent == sent


async def test_the_status_page_shows_the_instances_and_redis(
        io_loop, make_node, make_proxy, postgres_url, redis_url, redis_server):
    fake = await make_node()
    a = await make_proxy([fake], db=postgres_url, redis=redis_url, instance_name="a")
    b = await make_proxy(db=postgres_url, redis=redis_url, instance_name="b<i>&")
    await wait_for(lambda: all(len(p.ctx.cluster.instances) == 2 for p in (a, b)), 5)
    page = (await AsyncHTTPClient().fetch(a.url + "/ui")).body.decode()
    assert 'data-f="instances"' in page and "a, b&lt;i&gt;&amp;" in page and "<i>" not in page
    assert "Redis connected" in page
    shown = await state(a)
    assert shown["display"]["instances"] == "a, b<i>&"  # the page's script sets it as text
    assert shown["display"]["instance_count"] == "2"
    redis_server.stop()
    await wait_for(lambda: not a.ctx.cluster.connected, 5)
    assert (await state(a))["display"]["redis"].startswith("Redis unreachable")
    assert "Redis unreachable" in (await AsyncHTTPClient().fetch(a.url + "/ui")).body.decode()
    redis_server.start()
    await wait_for(lambda: a.ctx.cluster.connected, 5)


async def test_leases_asked_for_together_never_exceed_the_limit_and_all_come_back(
        io_loop, redis_url):
    import redis.asyncio as aioredis
    client = aioredis.Redis.from_url(redis_url)
    try:
        leases = Leases(client, "test")
        # Asked in one turn of the loop: sent as one pipeline of scripts.
        taken = await asyncio.gather(*(leases.acquire("slots:9", 5) for _ in range(40)))
        assert sum(taken) == 5 and await leases.count("slots:9") == 5
        for _ in range(5):
            leases.release("slots:9")
        await wait_for(lambda: not leases._sending and not leases._giving, 2)
        assert await leases.count("slots:9") == 0
    finally:
        await client.aclose()
