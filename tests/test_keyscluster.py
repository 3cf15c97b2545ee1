"""API keys over several instances: two Aivonx on one PostgreSQL and one
Redis. Key changes reach the other instance within a second; a key's limits
hold over both, and locally while Redis is unreachable."""
from __future__ import annotations

import asyncio
import time

import redis.asyncio as aioredis

from aivonx import store
from aivonx.cluster.keylimits import ADMIT, counter_names
from tests.helpers import call, login, wait_for

MODEL = "llama3:latest"


async def pair(make_proxy, nodes, postgres_url, redis_url):
    a = await make_proxy(nodes, db=postgres_url, redis=redis_url, instance_name="a")
    b = await make_proxy(db=postgres_url, redis=redis_url, instance_name="b")
    await wait_for(lambda: all(len(p.ctx.cluster.instances) == 2 for p in (a, b)), 5)
    token = await login(a)
    answer = await call(a, "PATCH", "/api/proxy/config", {"inference_auth": "keys"}, token)
    assert answer.code == 200
    await wait_for(lambda: b.ctx.keys.mode == "keys", 1.0)
    return a, b, token


async def new_key(proxy, token: str, **fields) -> dict:
    answer = await call(proxy, "POST", "/api/proxy/keys", {"name": "k", **fields}, token)
    assert answer.code == 201, answer
    return answer.json


async def chat(proxy, key: str, stream: bool = False):
    return await call(proxy, "POST", "/api/chat",
                      {"model": "llama3", "stream": stream,
                       "messages": [{"role": "user", "content": "one two three"}]},
                      headers={"Authorization": f"Bearer {key}"})


async def within_a_second(check) -> None:
    """Until `check()` (a coroutine) is true, for at most a second."""
    deadline = time.monotonic() + 1.0
    while not await check():
        assert time.monotonic() < deadline, "not within a second"
        await asyncio.sleep(0.02)


async def test_keys_created_edited_and_revoked_on_one_instance_hold_on_the_other(
        io_loop, make_node, make_proxy, postgres_url, redis_url):
    node = await make_node([MODEL])
    a, b, token = await pair(make_proxy, [node], postgres_url, redis_url)
    created = await new_key(a, token)
    key = created["key"]
    await within_a_second(lambda: _code_is(b, key, 200))
    edited = await call(a, "PATCH", f"/api/proxy/keys/{created['id']}", {"models": ["qwen*"]},
                        token)
    assert edited.code == 200
    await within_a_second(lambda: _code_is(b, key, 403))
    assert (await call(a, "PATCH", f"/api/proxy/keys/{created['id']}", {"models": []},
                       token)).code == 200
    await within_a_second(lambda: _code_is(b, key, 200))
    assert (await call(a, "DELETE", f"/api/proxy/keys/{created['id']}", token=token)).code == 204
    await within_a_second(lambda: _code_is(b, key, 401))
    # The access mode too: open again through b, a lets requests without a key in.
    assert (await call(b, "PATCH", "/api/proxy/config", {"inference_auth": "open"},
                       token)).code == 200
    await wait_for(lambda: a.ctx.keys.mode == "open", 1.0)


async def _code_is(proxy, key: str, code: int) -> bool:
    return (await chat(proxy, key)).code == code


async def test_an_rpm_of_10_holds_over_both_instances(io_loop, make_node, make_proxy,
                                                      postgres_url, redis_url):
    node = await make_node([MODEL])
    a, b, token = await pair(make_proxy, [node], postgres_url, redis_url)
    key = (await new_key(a, token, rpm=10))["key"]
    await within_a_second(lambda: _known(b, key))
    answers = [await chat(a if i % 2 else b, key) for i in range(14)]
    assert [r.code for r in answers] == [200] * 10 + [429] * 4
    for over in answers[10:]:
        assert "(rpm)" in over.json["error"] and 1 <= int(over.headers["Retry-After"]) <= 60
    assert len(node.requests_to("/api/chat")) == 10


async def _known(proxy, key: str) -> bool:
    return proxy.ctx.keys.keyring.check(key) is not None


async def test_max_concurrent_2_holds_over_both_instances(io_loop, make_node, make_proxy,
                                                          postgres_url, redis_url):
    node = await make_node([MODEL], chunk_delay=0.2, chunks=3)
    a, b, token = await pair(make_proxy, [node], postgres_url, redis_url)
    key = (await new_key(a, token, max_concurrent=2))["key"]
    await within_a_second(lambda: _known(b, key))
    first = [asyncio.ensure_future(chat(p, key, stream=True)) for p in (a, b)]
    await wait_for(lambda: len(node.requests_to("/api/chat")) == 2, 5)
    for proxy in (a, b):
        over = await chat(proxy, key)
        assert over.code == 429 and "max_concurrent" in over.json["error"]
        assert over.headers["Retry-After"] == "1"
    assert [r.code for r in await asyncio.gather(*first)] == [200, 200]
    assert (await chat(b, key)).code == 200   # given back on both
    assert (await chat(a, key)).code == 200


async def test_a_daily_quota_used_up_through_one_instance_refuses_on_the_other(
        io_loop, make_node, make_proxy, postgres_url, redis_url):
    node = await make_node([MODEL], chunks=5)
    a, b, token = await pair(make_proxy, [node], postgres_url, redis_url)
    # Each chat costs 3 prompt and 5 completion tokens.
    key = (await new_key(a, token, daily_tokens=10))["key"]
    await within_a_second(lambda: _known(b, key))
    assert (await chat(a, key)).code == 200   # 8
    assert (await chat(a, key)).code == 200   # 16
    await within_a_second(lambda: _code_is(b, key, 429))
    over = await chat(b, key)
    assert "(daily_tokens)" in over.json["error"] and 1 <= int(over.headers["Retry-After"])


async def test_redis_stopped_the_limits_still_apply_on_each_instance(
        io_loop, make_node, make_proxy, postgres_url, redis_server, redis_url):
    node = await make_node([MODEL])
    a, b, token = await pair(make_proxy, [node], postgres_url, redis_url)
    key = (await new_key(a, token, rpm=4))["key"]
    await within_a_second(lambda: _known(b, key))
    assert [(await chat(p, key)).code for p in (a, b)] == [200, 200]
    redis_server.stop()
    try:
        await wait_for(lambda: not a.ctx.cluster.connected and not b.ctx.cluster.connected, 5)
        # Each instance counts its own: a has one of its 4 used, b one.
        codes = [(await chat(a, key)).code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        codes = [(await chat(b, key)).code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
    finally:
        redis_server.start()
    await wait_for(lambda: a.ctx.cluster.connected and b.ctx.cluster.connected, 5)
    # Shared again: Redis lost its counts, a fresh window over both.
    codes = [(await chat(a if i % 2 else b, key)).code for i in range(6)]
    assert codes == [200] * 4 + [429] * 2


async def test_a_quota_spent_through_one_instance_holds_through_a_redis_restart(
        io_loop, make_node, make_proxy, postgres_url, redis_server, redis_url):
    node = await make_node([MODEL], chunks=5)
    a, b, token = await pair(make_proxy, [node], postgres_url, redis_url)
    created = await new_key(a, token, daily_tokens=10)
    key = created["key"]
    await within_a_second(lambda: _known(b, key))
    assert [(await chat(a, key)).code for _ in range(2)] == [200, 200]   # 16 tokens
    await within_a_second(lambda: _used(a, created["id"], 16))          # written by a
    redis_server.stop()
    try:
        await wait_for(lambda: not b.ctx.cluster.connected, 5)
        # b has served nothing of it, yet knows from the usage table.
        over = await chat(b, key)
        assert over.code == 429 and "(daily_tokens)" in over.json["error"]
    finally:
        redis_server.start()
    await wait_for(lambda: a.ctx.cluster.connected and b.ctx.cluster.connected, 5)
    for proxy in (b, a):   # Redis lost its counters: seeded again
        assert (await chat(proxy, key)).code == 429


async def _used(proxy, key_id: int, tokens: int) -> bool:
    days, _, _ = await store.run(proxy.ctx.keys.usage_totals)
    return days.get(key_id) == tokens


async def test_the_admission_script_counts_only_what_it_admits(io_loop, redis_url):
    redis = aioredis.Redis.from_url(redis_url)
    script = redis.register_script(ADMIT)
    now = time.time()
    names = list(counter_names(987654, now))
    try:
        # rpm 2: two admitted, the third refused with the wait until room.
        def args(n: int, daily: int = 0, seed: int = 0, rpm: int = 2) -> list:
            return [rpm, f"t{n}", daily, 0, seed, 0, 100, 100]

        assert [await script(keys=names, args=args(i)) for i in range(2)] == [[0, 0], [0, 0]]
        code, wait_ms = await script(keys=names, args=args(3))
        assert code == 1 and 59000 <= wait_ms <= 60000
        assert await redis.zcard(names[0]) == 2
        # The day's counter: seeded once when absent, refused at the quota.
        assert await script(keys=names, args=args(4, daily=10, seed=9, rpm=0)) == [0, 0]
        assert await script(keys=names, args=args(5, daily=10, seed=0, rpm=0)) == [0, 0]
        assert int(await redis.get(names[1])) == 9 and 0 < await redis.ttl(names[1]) <= 100
        await redis.incrby(names[1], 1)
        assert await script(keys=names, args=args(6, daily=10, rpm=3)) == [2, 0]
        assert await redis.zcard(names[0]) == 2   # refused: not counted in the window
    finally:
        await redis.delete(*names)
        await redis.aclose()
