"""The store on PostgreSQL: what admins configure, shared by instances that
start together, and an unreachable database answered with 503 while
serving goes on."""
from __future__ import annotations

import asyncio

import ollama
import peewee

from aivonx import store
from tests.helpers import ROOT_PASSWORD, call, login, start_aivonx


async def test_nodes_and_config_live_in_postgresql(io_loop, make_node, make_proxy,
                                                   postgres_url):
    fake = await make_node()
    proxy = await make_proxy(db=postgres_url)
    assert isinstance(proxy.ctx.db, peewee.PostgresqlDatabase) and proxy.ctx.db_lock is None
    token = await login(proxy)
    created = await call(proxy, "POST", "/api/proxy/nodes",
                         {"address": fake.url, "slots": 2}, token=token)
    assert created.code == 201, created
    gone = await call(proxy, "POST", "/api/proxy/nodes", {"address": "127.0.0.1:1"},
                      token=token)
    assert (await call(proxy, "DELETE", f"/api/proxy/nodes/{gone.json['id']}",
                       token=token)).code == 204
    again = await call(proxy, "POST", "/api/proxy/nodes", {"address": "127.0.0.1:2"},
                       token=token)
    assert again.json["id"] > gone.json["id"]  # a deleted node's id is never reused
    duplicate = await call(proxy, "POST", "/api/proxy/nodes", {"address": fake.url},
                           token=token)
    assert duplicate.code == 409
    config = await call(proxy, "PATCH", "/api/proxy/config",
                        {"strategy": "least_active", "keep_alive": {"default": "10m"}},
                        token=token)
    assert config.code == 200, config
    await proxy.stop()

    restarted = await make_proxy(db=postgres_url)
    assert restarted.ctx.router.strategy == "least_active"
    assert restarted.ctx.keep_alive.as_dict()["default"] == "10m"
    assert sorted(n.port for n in restarted.registry.nodes.values()) == [2, fake.port]
    answer = await ollama.AsyncClient(host=restarted.url).generate(
        model="llama3", prompt="hi", stream=False)
    assert answer.done


async def test_instances_starting_at_once_share_one_schema(io_loop, make_node, postgres_url):
    fake = await make_node()
    env = {"AIVONX_ROOT_PASSWORD": ROOT_PASSWORD}
    started = await asyncio.gather(
        *(start_aivonx("--db", postgres_url, "--node", fake.url, env=env) for _ in range(3)),
        return_exceptions=True)
    try:
        assert not [s for s in started if isinstance(s, BaseException)], started
        for instance in started:
            answer = await ollama.AsyncClient(host=instance.url).generate(
                model="llama3", prompt="hi", stream=False)
            assert answer.done
    finally:
        for instance in started:
            if not isinstance(instance, BaseException):
                await instance.stop()
    # One root and one node, whoever created them.
    db = store.open_database(postgres_url)
    try:
        assert [u.username for u in store.User.select()] == ["root"]
        assert [n.port for n in store.Node.select()] == [fake.port]
    finally:
        store.close_database(db)


async def test_an_unreachable_database_answers_503_and_serving_goes_on(
        io_loop, make_node, make_proxy, postgres_server, postgres_url):
    fake = await make_node()
    proxy = await make_proxy([fake], db=postgres_url)
    token = await login(proxy)
    client = ollama.AsyncClient(host=proxy.url)
    postgres_server.stop()
    try:
        answer = await call(proxy, "POST", "/api/proxy/nodes", {"address": "127.0.0.1:3"},
                            token=token)
        assert answer.code == 503, answer
        assert answer.json["error"] == ("the database is unavailable; nothing was changed, "
                                        "try again")
        assert int(answer.headers["Retry-After"]) >= 1
        strategy = await call(proxy, "PATCH", "/api/proxy/config", {"strategy": "round_robin"},
                              token=token)
        assert strategy.code == 503 and proxy.ctx.router.strategy != "round_robin"
        assert (await client.generate(model="llama3", prompt="hi", stream=False)).done
    finally:
        postgres_server.start()
    added = await call(proxy, "POST", "/api/proxy/nodes", {"address": "127.0.0.1:3"},
                       token=token)
    if added.code == 503:  # the first use of a pooled connection the restart dropped
        added = await call(proxy, "POST", "/api/proxy/nodes", {"address": "127.0.0.1:3"},
                           token=token)
    assert added.code == 201, added


async def test_keys_usage_and_audit_work_on_postgresql(io_loop, make_node, make_proxy,
                                                       postgres_url):
    fake = await make_node()
    proxy = await make_proxy([fake], db=postgres_url)
    token = await login(proxy)
    key = await call(proxy, "POST", "/api/proxy/keys", {"name": "alice"}, token=token)
    assert key.code == 201, key
    client = ollama.AsyncClient(host=proxy.url,
                                headers={"Authorization": f"Bearer {key.json['key']}"})
    assert (await client.generate(model="llama3", prompt="hi", stream=False)).done
    proxy.ctx.keys.flush()
    for group in ("hour", "day", "month"):
        usage = await call(proxy, "GET", f"/api/proxy/usage?group_by=key,{group}", token=token)
        assert usage.code == 200, usage
        rows = [r for r in usage.json["results"] if r["key"] == "alice"]
        assert len(rows) == 1 and rows[0]["requests"] == 1, usage.json
    audit = await call(proxy, "GET", "/api/proxy/audit", token=token)
    assert audit.code == 200 and audit.json
