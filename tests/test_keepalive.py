"""The admins' keep_alive policy: what nodes are told about keeping models loaded."""
from __future__ import annotations

import json

import ollama
import pytest

from aivonx.keepalive import KeepAlivePolicy, check_duration
from tests.helpers import call, login


def last_keep_alive(node, path: str):
    return node.requests_to(path)[-1].json.get("keep_alive", "absent")


async def test_the_policy_fills_in_and_enforces_keep_alive(io_loop, make_node, make_proxy,
                                                           tmp_path):
    node = await make_node(["llama3:latest", "nomic-embed-text:latest"])
    db = str(tmp_path / "k.db")
    proxy = await make_proxy([node], db=db)
    token = await login(proxy)
    client = ollama.AsyncClient(host=proxy.url)
    await client.generate(model="llama3", prompt="x")
    assert last_keep_alive(node, "/api/generate") == "absent"  # no policy: as the client asks

    answer = await call(proxy, "PATCH", "/api/proxy/config", {"keep_alive": {
        "default": "30m", "models": {"nomic-embed-text": -1}}}, token=token)
    assert answer.code == 200, answer
    assert answer.json["keep_alive"] == {"default": "30m", "enforce": False,
                                         "models": {"nomic-embed-text": -1}}
    await client.generate(model="llama3", prompt="x")
    assert last_keep_alive(node, "/api/generate") == "30m"
    await client.embed(model="nomic-embed-text", input="x")
    assert last_keep_alive(node, "/api/embed") == -1
    await client.chat(model="llama3", messages=[{"role": "user", "content": "x"}],
                      keep_alive="2m")
    assert last_keep_alive(node, "/api/chat") == "2m"  # the client's own wins...

    answer = await call(proxy, "PATCH", "/api/proxy/config", {"keep_alive": {"enforce": True}},
                        token=token)
    assert answer.json["keep_alive"]["enforce"] is True and answer.json["keep_alive"]["default"] == "30m"
    await client.chat(model="llama3", messages=[{"role": "user", "content": "x"}],
                      keep_alive="2m")
    assert last_keep_alive(node, "/api/chat") == "30m"  # ...unless the policy is enforced
    # A large body (scanned, not parsed) gets it too.
    await client.embed(model="nomic-embed-text", input=["y" * 400_000], keep_alive=0)
    assert last_keep_alive(node, "/api/embed") == -1

    await proxy.stop()
    again = await make_proxy([node], db=db)
    answer = await call(again, "GET", "/api/proxy/config", token=await login(again))
    assert answer.json["keep_alive"]["models"] == {"nomic-embed-text": -1}
    page = await call(again, "GET", "/ui")
    assert "keep_alive: 30m; nomic-embed-text -1 (enforced)" in page.text


async def test_an_enforced_policy_keeps_clients_from_unloading(io_loop, make_node, make_proxy):
    node = await make_node()
    proxy = await make_proxy([node])
    token = await login(proxy)
    await call(proxy, "PUT", "/api/proxy/config", {"strategy": "least_active", "keep_alive": {
        "default": "1h", "enforce": True}}, token=token)
    client = ollama.AsyncClient(host=proxy.url)
    await client.generate(model="llama3", prompt="hi")
    await client.generate(model="llama3", keep_alive=0)  # what `ollama stop` sends
    assert last_keep_alive(node, "/api/generate") == "1h"
    assert [m.model for m in (await client.ps()).models] == ["llama3:latest"]


@pytest.mark.parametrize("policy,field", [
    ({"default": "soon"}, "keep_alive.default"),
    ({"default": True}, "keep_alive.default"),
    ({"models": {"a//b": "1m"}}, "keep_alive.models.a//b"),
    ({"models": {"llama3": "5 minutes"}}, "keep_alive.models.llama3"),
    ({"enforce": "yes"}, "keep_alive.enforce"),
    ({"forever": 1}, "keep_alive"),
    ("1h", "keep_alive"),
])
async def test_a_bad_policy_is_refused_by_field(io_loop, make_proxy, policy, field):
    proxy = await make_proxy()
    token = await login(proxy)
    answer = await call(proxy, "PATCH", "/api/proxy/config", {"keep_alive": policy}, token=token)
    assert answer.code == 400 and field in answer.json["fields"], answer
    assert (await call(proxy, "GET", "/api/proxy/config", token=token)).json["keep_alive"] == {
        "default": None, "enforce": False, "models": {}}


def test_durations_as_ollama_reads_them():
    assert check_duration("5m") == "5m" and check_duration("1h30m") == "1h30m"
    assert check_duration("-1m") == "-1m" and check_duration("300ms") == "300ms"
    assert check_duration("-1") == -1 and check_duration(600) == 600
    for bad in ("", "m", "1d", "1h 30m", float("nan"), None, [], "1" * 50):
        with pytest.raises(ValueError):
            check_duration(bad)


def test_the_member_is_appended_so_the_last_one_wins():
    policy = KeepAlivePolicy()
    policy.update({"default": "10m", "enforce": True})
    body = {"model": "m", "keep_alive": 0}
    out = policy.apply("m:latest", body, b'{"model": "m", "keep_alive": 0}  ')
    assert json.loads(out)["keep_alive"] == "10m" and body["keep_alive"] == "10m"
    assert json.loads(policy.apply("m:latest", {}, b"{ }")) == {"keep_alive": "10m"}
