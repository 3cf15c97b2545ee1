"""Inference and admin keys through the real HTTP interface and real clients:
access, allow-lists, limits, revocation, usage accounting, the fair queue."""
from __future__ import annotations

import asyncio
import json

import anthropic
import ollama
import openai
import pytest
from tornado.httpclient import AsyncHTTPClient

from tests.helpers import call, login

MODEL = "llama3:latest"


async def keys_on(proxy) -> str:
    """Turn inference_auth to "keys"; returns an admin access token."""
    token = await login(proxy)
    answer = await call(proxy, "PATCH", "/api/proxy/config", {"inference_auth": "keys"}, token)
    assert answer.code == 200 and answer.json["inference_auth"] == "keys", answer
    return token


async def new_key(proxy, token: str, **fields) -> dict:
    answer = await call(proxy, "POST", "/api/proxy/keys", {"name": "k", **fields}, token)
    assert answer.code == 201, answer
    return answer.json


async def chat(proxy, key: str | None, model: str = "llama3", stream: bool = False,
               header: str = "Authorization"):
    headers = {}
    if key is not None:
        headers[header] = f"Bearer {key}" if header == "Authorization" else key
    return await call(proxy, "POST", "/api/chat",
                      {"model": model, "stream": stream,
                       "messages": [{"role": "user", "content": "one two three"}]},
                      headers=headers)


async def usage(proxy, token: str, **query) -> list[dict]:
    args = "&".join(f"{k}={v}" for k, v in query.items())
    answer = await call(proxy, "GET", f"/api/proxy/usage?{args}", token=token)
    assert answer.code == 200, answer
    return answer.json["results"]


async def test_sdks_work_with_a_key_and_get_401_without(io_loop, make_node, make_proxy):
    node = await make_node([MODEL])
    proxy = await make_proxy([node])
    token = await keys_on(proxy)
    created = await new_key(proxy, token, name="sdk")
    key = created["key"]
    assert key.startswith("avx_") and created["prefix"] == key[:12]
    listed = await call(proxy, "GET", "/api/proxy/keys", token=token)
    assert listed.json["count"] == 1 and key not in listed.text

    good = ollama.AsyncClient(host=proxy.url, headers={"Authorization": f"Bearer {key}"})
    answer = await good.chat(model="llama3", messages=[{"role": "user", "content": "hi"}])
    assert answer.message.content == "tok0 tok1 tok2 tok3 tok4 "
    assert [m.model for m in (await good.list()).models] == [MODEL]
    for client in (ollama.AsyncClient(host=proxy.url),
                   ollama.AsyncClient(host=proxy.url, headers={"Authorization": "Bearer nope"})):
        with pytest.raises(ollama.ResponseError) as refused:
            await client.chat(model="llama3", messages=[{"role": "user", "content": "hi"}])
        assert refused.value.status_code == 401
        with pytest.raises(ollama.ResponseError) as refused:
            await client.list()
        assert refused.value.status_code == 401

    oa = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0)
    done = await oa.chat.completions.create(model="llama3",
                                            messages=[{"role": "user", "content": "hi"}])
    assert done.choices[0].message.content
    assert [m.id for m in (await oa.models.list()).data] == [MODEL]
    wrong = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="avx_wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        await wrong.chat.completions.create(model="llama3",
                                            messages=[{"role": "user", "content": "hi"}])
    assert refused.value.body["message"].startswith("invalid or expired API key")

    # x-api-key, as Anthropic clients send it, is a key too; the node sees neither.
    assert (await chat(proxy, key, header="x-api-key")).code == 200
    seen = node.requests_to("/api/chat")[-1].headers
    assert "authorization" not in seen and "x-api-key" not in seen
    # Health checks stay open.
    assert (await call(proxy, "GET", "/")).code == 200
    assert (await call(proxy, "HEAD", "/")).code == 200


async def test_allow_list_answers_403_and_globs_match(io_loop, make_node, make_proxy):
    node = await make_node([MODEL, "mistral:7b", "llama3.2:1b"])
    proxy = await make_proxy([node])
    token = await keys_on(proxy)
    key = (await new_key(proxy, token, models=["llama3*"]))["key"]
    assert (await chat(proxy, key, "llama3")).code == 200
    assert (await chat(proxy, key, "llama3.2:1b")).code == 200
    refused = await chat(proxy, key, "mistral:7b")
    assert refused.code == 403 and "mistral:7b" in refused.json["error"]
    exact = (await new_key(proxy, token, models=["llama3"]))["key"]
    assert (await chat(proxy, exact, "LLaMA3:latest")).code == 200
    assert (await chat(proxy, exact, "llama3.2:1b")).code == 403
    # An OpenAI client gets its own error shape.
    answer = await call(proxy, "POST", "/v1/chat/completions",
                        {"model": "mistral:7b", "messages": [{"role": "user", "content": "x"}]},
                        headers={"Authorization": f"Bearer {key}"})
    assert answer.code == 403 and "mistral" in answer.json["error"]["message"]


async def test_rpm_limit_answers_429_at_the_right_count_and_recovers(io_loop, make_node,
                                                                     make_proxy):
    node = await make_node([MODEL])
    proxy = await make_proxy([node])
    token = await keys_on(proxy)
    created = await new_key(proxy, token, rpm=3)
    key = created["key"]
    for _ in range(3):
        assert (await chat(proxy, key)).code == 200
    over = await chat(proxy, key)
    assert over.code == 429 and "(rpm)" in over.json["error"]
    assert 1 <= int(over.headers["Retry-After"]) <= 60
    # The window slides: requests older than a minute no longer count.
    use = proxy.ctx.keys.limits.uses[created["id"]]
    use.recent[0] -= 61
    assert (await chat(proxy, key)).code == 200
    assert (await chat(proxy, key)).code == 429
    # Raising the limit takes effect at once.
    await call(proxy, "PATCH", f"/api/proxy/keys/{created['id']}", {"rpm": 10}, token)
    assert (await chat(proxy, key)).code == 200


async def test_max_concurrent_counts_queued_requests_and_recovers(io_loop, make_node,
                                                                  make_proxy):
    node = await make_node([MODEL], chunk_delay=0.2, chunks=3)
    proxy = await make_proxy([node])
    token = await keys_on(proxy)
    key = (await new_key(proxy, token, max_concurrent=2))["key"]
    first = [asyncio.ensure_future(chat(proxy, key, stream=True)) for _ in range(2)]
    while len(node.requests_to("/api/chat")) < 2:
        await asyncio.sleep(0.01)
    over = await chat(proxy, key)
    assert over.code == 429 and "max_concurrent" in over.json["error"]
    assert over.headers["Retry-After"] == "1"
    assert [a.code for a in await asyncio.gather(*first)] == [200, 200]
    assert (await chat(proxy, key)).code == 200


async def test_token_quotas_refuse_the_next_request_not_the_stream(io_loop, make_node,
                                                                   make_proxy):
    node = await make_node([MODEL], chunks=5)
    proxy = await make_proxy([node])
    token = await keys_on(proxy)
    # Each chat costs 3 prompt tokens ("one two three") and 5 completion tokens.
    daily = await new_key(proxy, token, daily_tokens=10)
    assert (await chat(proxy, daily["key"], stream=True)).code == 200      # 8 used
    second = await chat(proxy, daily["key"], stream=True)                  # 16: not cut
    assert second.code == 200 and second.lines[-1]["done"] is True
    over = await chat(proxy, daily["key"])
    assert over.code == 429 and "(daily_tokens)" in over.json["error"]
    assert 1 <= int(over.headers["Retry-After"]) <= 86400
    monthly = await new_key(proxy, token, monthly_tokens=8)
    assert (await chat(proxy, monthly["key"])).code == 200
    over = await chat(proxy, monthly["key"])
    assert over.code == 429 and "(monthly_tokens)" in over.json["error"]
    assert int(over.headers["Retry-After"]) <= 31 * 86400
    # A new UTC day starts the daily count again (the month's stays).
    proxy.ctx.keys.limits.uses[daily["id"]].day -= 1
    assert (await chat(proxy, daily["key"])).code == 200


async def test_revoked_or_expired_key_stops_at_once(io_loop, make_node, make_proxy):
    node = await make_node([MODEL])
    proxy = await make_proxy([node])
    token = await keys_on(proxy)
    created = await new_key(proxy, token)
    assert (await chat(proxy, created["key"])).code == 200
    answer = await call(proxy, "DELETE", f"/api/proxy/keys/{created['id']}", token=token)
    assert answer.code == 204
    assert (await chat(proxy, created["key"])).code == 401
    shown = await call(proxy, "GET", f"/api/proxy/keys/{created['id']}", token=token)
    assert shown.json["revoked"] is True and shown.json["last_used_at"] is not None
    bad = await call(proxy, "POST", "/api/proxy/keys",
                     {"name": "x", "expires_at": "2001-01-01T00:00:00Z", "rpm": 0,
                      "kind": "root"}, token)
    assert bad.code == 400 and set(bad.json["fields"]) == {"expires_at", "rpm", "kind"}
    later = await new_key(proxy, token, expires_at="2999-01-01T00:00:00Z")
    assert (await chat(proxy, later["key"])).code == 200
    proxy.ctx.keys.keyring.by_id[later["id"]].expires_at = 1.0  # the moment passes
    assert (await chat(proxy, later["key"])).code == 401


async def test_usage_equals_the_nodes_token_counts(io_loop, make_node, make_proxy):
    node = await make_node([MODEL], chunks=4)
    proxy = await make_proxy([node])
    token = await keys_on(proxy)
    created = await new_key(proxy, token, name="team")
    key = created["key"]
    headers = {"Authorization": f"Bearer {key}"}
    client = ollama.AsyncClient(host=proxy.url, headers=headers)
    await client.chat(model="llama3", messages=[{"role": "user", "content": "a b c"}])
    async for _ in await client.generate(model="llama3", prompt="a b", stream=True):
        pass
    await client.embed(model="llama3", input=["x y", "z"])  # 3 prompt tokens
    oa = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0)
    messages = [{"role": "user", "content": "a b c d e"}]
    await oa.chat.completions.create(model="llama3", messages=messages)
    async for _ in await oa.chat.completions.create(
            model="llama3", messages=messages, stream=True,
            stream_options={"include_usage": True}):
        pass
    rows = await usage(proxy, token, key_id=created["id"])
    assert len(rows) == 1 and rows[0]["model"] == MODEL and rows[0]["key"] == "team"
    assert rows[0]["requests"] == 5 and rows[0]["errors"] == 0 and rows[0]["estimated"] == 0
    assert rows[0]["prompt_tokens"] == 3 + 2 + 3 + 5 + 5
    assert rows[0]["completion_tokens"] == 4 + 4 + 0 + 4 + 4

    # A /v1 stream without usage: completion tokens counted from its chunks,
    # the request marked estimated.
    async for _ in await oa.chat.completions.create(model="llama3", messages=messages,
                                                    stream=True):
        pass
    rows = await usage(proxy, token, key_id=created["id"])
    assert rows[0]["requests"] == 6 and rows[0]["estimated"] == 1
    assert rows[0]["completion_tokens"] == 16 + 4 and rows[0]["prompt_tokens"] > 18
    # Grouped by day, as CSV for a spreadsheet.
    answer = await call(proxy, "GET", "/api/proxy/usage?group_by=key,day&format=csv",
                        token=token)
    assert answer.code == 200 and answer.headers["Content-Type"].startswith("text/csv")
    header, line = answer.text.splitlines()
    assert header.startswith("key_id,key,day,requests") and ",team," in line


async def test_anonymous_usage_is_counted_when_open_and_errors_too(io_loop, make_node,
                                                                   make_proxy):
    node = await make_node([MODEL], chunks=2)
    proxy = await make_proxy([node])
    token = await login(proxy)
    assert (await chat(proxy, None)).code == 200
    assert (await chat(proxy, None, "nosuchmodel")).code == 404
    rows = await usage(proxy, token)
    by_model = {r["model"]: r for r in rows}
    assert by_model[MODEL]["key"] == "anonymous" and by_model[MODEL]["key_id"] == 0
    assert (by_model[MODEL]["prompt_tokens"], by_model[MODEL]["completion_tokens"]) == (3, 2)
    assert by_model["(unknown)"]["errors"] == 1


async def test_usage_survives_a_restart(io_loop, make_node, make_proxy, tmp_path):
    node = await make_node([MODEL], chunks=3)
    db = str(tmp_path / "kept.db")
    proxy = await make_proxy([node], db=db)
    token = await keys_on(proxy)
    created = await new_key(proxy, token, daily_tokens=12)
    for _ in range(2):
        assert (await chat(proxy, created["key"])).code == 200
    await proxy.stop()
    again = await make_proxy([node], db=db)
    token = await login(again)
    rows = await usage(again, token, key_id=created["id"])
    assert (rows[0]["requests"], rows[0]["prompt_tokens"], rows[0]["completion_tokens"]) == (
        2, 6, 6)
    # The quota remembers the day's tokens; the key and the mode survive too.
    over = await chat(again, created["key"])
    assert over.code == 429 and "daily_tokens" in over.json["error"]
    assert (await chat(again, None)).code == 401


async def test_admin_key_works_on_pull_and_stops_after_revocation(io_loop, make_node,
                                                                  make_proxy):
    node = await make_node([MODEL])
    proxy = await make_proxy([node])
    token = await login(proxy)
    admin = await new_key(proxy, token, name="open-webui", kind="admin")
    inference = await new_key(proxy, token, name="user")
    body = {"model": "qwen2:0.5b", "stream": False}
    answer = await call(proxy, "POST", "/api/pull", body, admin["key"])
    assert answer.code == 200 and answer.json == {"status": "success"}
    assert (await call(proxy, "POST", "/api/pull", body, inference["key"])).code == 401
    # The same key serves chat, as Open WebUI sends it for everything.
    assert (await chat(proxy, admin["key"])).code == 200
    listed = await call(proxy, "GET", "/api/proxy/keys", token=admin["key"])
    assert [k["name"] for k in listed.json["results"]] == ["open-webui", "user"]
    assert listed.json["results"][0]["last_used_at"] is not None
    await call(proxy, "DELETE", f"/api/proxy/keys/{admin['id']}", token=token)
    assert (await call(proxy, "POST", "/api/pull", body, admin["key"])).code == 401
    audit = await call(proxy, "GET", "/api/proxy/audit", token=token)
    actions = [(e["actor"], e["action"], e["status"]) for e in audit.json["results"]]
    assert ("root", f"DELETE /api/proxy/keys/{admin['id']}", 204) in actions
    assert ("root (key 'open-webui')", "POST /api/pull", 200) in actions
    creation = [e for e in audit.json["results"] if e["action"] == "POST /api/proxy/keys"]
    assert json.loads(creation[-1]["detail"]) == {"name": "open-webui", "kind": "admin"}
    assert all(admin["key"] not in e["detail"] for e in audit.json["results"])


async def test_failed_logins_are_audited(io_loop, make_proxy):
    proxy = await make_proxy([])
    answer = await call(proxy, "POST", "/api/account/login",
                        {"username": "root", "password": "wrong-password"})
    assert answer.code == 401
    token = await login(proxy)
    audit = await call(proxy, "GET", "/api/proxy/audit", token=token)
    entry = audit.json["results"][0]
    assert (entry["actor"], entry["action"], entry["status"], entry["address"]) == (
        "root", "login failed", 401, "127.0.0.1")


def sender(proxy, max_clients: int, timeout: float):
    """(client, send): send(key, text) is a non-streamed generate with that
    key, on one client with room for the whole flood at once."""
    http = AsyncHTTPClient(force_instance=True, max_clients=max_clients)

    def send(key: str, text: str):
        return http.fetch(proxy.url + "/api/generate", method="POST", raise_error=False,
                          headers={"Authorization": f"Bearer {key}"}, request_timeout=timeout,
                          body=json.dumps({"model": "llama3", "prompt": text,
                                           "stream": False}))
    return http, send


async def test_a_flooding_key_does_not_hold_up_another(io_loop, make_node, make_proxy):
    node = await make_node([MODEL], chunks=2, chunk_delay=0.01)
    proxy = await make_proxy([node])
    token = await keys_on(proxy)
    state = next(iter(proxy.registry.nodes.values()))
    answer = await call(proxy, "PATCH", f"/api/proxy/nodes/{state.id}", {"slots": 2}, token)
    assert answer.code == 200
    a = (await new_key(proxy, token, name="batch"))["key"]
    b = (await new_key(proxy, token, name="chat"))["key"]
    http, send = sender(proxy, max_clients=300, timeout=120)
    flood = [send(a, f"a{i}") for i in range(200)]
    while proxy.ctx.scheduler.depth < 60:
        await asyncio.sleep(0.01)
    started_before = len(node.requests_to("/api/generate"))
    chats = [send(b, f"b{i}") for i in range(10)]
    results = await asyncio.gather(*flood, *chats)
    http.close()
    assert all(r.code == 200 for r in results)
    order = [r.json["prompt"] for r in node.requests_to("/api/generate")]
    positions = [i for i, prompt in enumerate(order) if prompt.startswith("b")]
    # Round-robin: B's ten requests alternate with A's, all served within
    # about twenty turns of arriving, not after A's whole flood.
    assert positions[-1] - started_before <= 2 * 10 + 4, (started_before, positions)
    assert order.index("a199") > positions[-1]


async def test_anthropic_and_responses_clients_with_keys_and_their_usage(io_loop, make_node,
                                                                         make_proxy):
    node = await make_node([MODEL], chunks=3)
    proxy = await make_proxy([node])
    token = await keys_on(proxy)
    created = await new_key(proxy, token, name="agent")
    claude = anthropic.AsyncAnthropic(base_url=proxy.url, api_key=created["key"],
                                      max_retries=0)
    messages = [{"role": "user", "content": "a b c d"}]
    message = await claude.messages.create(model="llama3", max_tokens=16, messages=messages)
    assert message.content[0].text == "tok0 tok1 tok2 "
    async with claude.messages.stream(model="llama3", max_tokens=16,
                                      messages=messages) as stream:
        await stream.get_final_message()
    without = anthropic.AsyncAnthropic(base_url=proxy.url, api_key="sk-ant-other",
                                       max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as refused:
        await without.messages.create(model="llama3", max_tokens=16, messages=messages)
    assert refused.value.body["error"]["type"] == "authentication_error"
    rows = await usage(proxy, token, key_id=created["id"])
    assert (rows[0]["requests"], rows[0]["prompt_tokens"], rows[0]["completion_tokens"]) == (
        2, 4 + 4, 3 + 3)

    oa = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=created["key"], max_retries=0)
    await oa.responses.create(model="llama3", input="a b")
    async for _ in await oa.responses.create(model="llama3", input="a b", stream=True):
        pass
    rows = await usage(proxy, token, key_id=created["id"])
    assert rows[0]["requests"] == 4 and rows[0]["estimated"] == 0
    assert rows[0]["completion_tokens"] == 6 + 3 + 3 and rows[0]["prompt_tokens"] == 8 + 2 + 2
    await claude.close()
    await without.close()


async def test_a_key_of_priority_2_gets_two_turns_for_one(io_loop, make_node, make_proxy):
    node = await make_node([MODEL], chunks=1, chunk_delay=0.01)
    proxy = await make_proxy([node])
    token = await keys_on(proxy)
    state = next(iter(proxy.registry.nodes.values()))
    await call(proxy, "PATCH", f"/api/proxy/nodes/{state.id}", {"slots": 1}, token)
    low = (await new_key(proxy, token, name="low"))["key"]
    high = (await new_key(proxy, token, name="high", priority=2))["key"]
    http, send = sender(proxy, max_clients=100, timeout=60)
    requests = [send(low, f"l{i}") for i in range(20)]
    while proxy.ctx.scheduler.depth < 15:
        await asyncio.sleep(0.01)
    requests += [send(high, f"h{i}") for i in range(10)]
    high_id = proxy.ctx.keys.keyring.check(high).id
    while sum(1 for w in proxy.ctx.scheduler.waiters if w.owner == high_id) + sum(
            1 for r in node.requests_to("/api/generate") if r.json["prompt"][0] == "h") < 10:
        await asyncio.sleep(0.005)
    assert all(r.code == 200 for r in await asyncio.gather(*requests))
    http.close()
    order = [r.json["prompt"][0] for r in node.requests_to("/api/generate")]
    first_high = order.index("h")
    served = order[first_high:first_high + 15]
    # While both wait: two of "high" for each one of "low".
    assert served.count("h") == 10 and served.count("l") == 5, order
