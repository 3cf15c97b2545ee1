"""Ollama's newer API through Aivonx with the real clients: the anthropic SDK on
/v1/messages, the openai SDK on /v1/responses, blob uploads with `ollama create`
from files, and thinking and tool calls on the native API."""
from __future__ import annotations

import asyncio
import hashlib
import json

import anthropic
import ollama
import openai
import pytest

from tests.helpers import call, login
from tests.helpers import WEATHER, admin_client

CHAT = "llama3:latest"
MESSAGE = [{"role": "user", "content": "hello"}]


@pytest.fixture
def cluster(make_node, make_proxy):
    async def build(**options):
        a = await make_node([CHAT], **options)
        b = await make_node([CHAT], **options)
        return a, b, await make_proxy([a, b])
    return build


def claude(proxy, **options) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=proxy.url, api_key="sk-ant-secret",
                                    max_retries=0, **options)


def served(*nodes, path: str):
    return [r for node in nodes for r in node.requests_to(path)]


# ---------------------------------------------------------------- /v1/messages


async def test_anthropic_messages_create_and_stream(io_loop, cluster):
    a, b, proxy = await cluster()
    client = claude(proxy)
    message = await client.messages.create(model="LLaMA3", max_tokens=32, messages=MESSAGE)
    assert message.content[0].text == "tok0 tok1 tok2 tok3 tok4 "
    assert message.model == "LLaMA3" and message.stop_reason == "end_turn"
    async with client.messages.stream(model=CHAT, max_tokens=32, messages=MESSAGE,
                                      thinking={"type": "enabled", "budget_tokens": 8}
                                      ) as stream:
        texts = [text async for text in stream.text_stream]
        final = await stream.get_final_message()
    assert texts == [f"tok{i} " for i in range(5)]
    assert [block.type for block in final.content] == ["thinking", "text"]
    sent = served(a, b, path="/v1/messages")
    assert len(sent) == 2 and sent[1].json["thinking"] == {"type": "enabled", "budget_tokens": 8}
    # The client's key is for the proxy: no node ever sees it.
    assert all("x-api-key" not in r.headers and "authorization" not in r.headers for r in sent)
    await client.close()


async def test_anthropic_tool_use_streams_through(io_loop, cluster):
    _, _, proxy = await cluster()
    client = claude(proxy)
    tool = {"name": "get_weather", "input_schema": WEATHER["function"]["parameters"]}
    async with client.messages.stream(model=CHAT, max_tokens=32, messages=MESSAGE,
                                      tools=[tool]) as stream:
        final = await stream.get_final_message()
    assert final.stop_reason == "tool_use" and final.content[0].input == {"city": "tok0"}
    await client.close()


async def test_anthropic_errors_are_in_anthropic_shape(io_loop, cluster):
    _, _, proxy = await cluster()
    client = claude(proxy)
    with pytest.raises(anthropic.NotFoundError) as missing:
        await client.messages.create(model="nope", max_tokens=8, messages=MESSAGE)
    assert missing.value.body == {"type": "error", "error": {
        "type": "not_found_error", "message": "model 'nope' not found"}}
    with pytest.raises(anthropic.BadRequestError) as bad:
        await client.messages.create(model="", max_tokens=8, messages=MESSAGE)
    assert bad.value.body["type"] == "error"
    answer = await call(proxy, "POST", "/v1/messages", raw=b"{not json")
    assert answer.code == 400 and answer.json["error"]["type"] == "invalid_request_error"
    await client.close()


async def test_anthropic_failover_before_the_first_byte(io_loop, cluster):
    a, b, proxy = await cluster()
    a.fail_status = b.fail_status = 500
    client = claude(proxy)
    with pytest.raises(anthropic.InternalServerError) as failed:
        await client.messages.create(model=CHAT, max_tokens=8, messages=MESSAGE)
    assert failed.value.body["type"] == "error"
    assert len(served(a, b, path="/v1/messages")) == 2  # both tried, no retry by the SDK
    b.fail_status = None
    message = await client.messages.create(model=CHAT, max_tokens=8, messages=MESSAGE)
    assert message.content[0].text
    await client.close()


async def test_anthropic_node_dying_mid_stream_ends_with_an_error_event(io_loop, cluster):
    a, b, proxy = await cluster()
    a.die_after = b.die_after = 4
    client = claude(proxy)
    texts = []
    with pytest.raises(anthropic.APIStatusError) as broken:
        async with client.messages.stream(model=CHAT, max_tokens=8, messages=MESSAGE) as stream:
            async for text in stream.text_stream:
                texts.append(text)
    assert texts == ["tok0 ", "tok1 "]  # what came before the failure reached the client
    assert broken.value.body["type"] == "error"
    assert "failed mid-response" in broken.value.body["error"]["message"]
    await client.close()


async def test_anthropic_client_leaving_closes_the_node_connection(io_loop, cluster):
    a, b, proxy = await cluster(chunk_delay=0.2, chunks=50)
    client = claude(proxy)
    async with client.messages.stream(model=CHAT, max_tokens=8, messages=MESSAGE) as stream:
        async for _ in stream.text_stream:
            break
    await client.close()
    for _ in range(200):
        sent = served(a, b, path="/v1/messages")
        if sent and sent[0].client_closed_at is not None:
            break
        await asyncio.sleep(0.01)
    assert sent[0].client_closed_at is not None and sent[0].finished_at is None


# ---------------------------------------------------------------- /v1/responses


async def test_openai_responses_create_and_stream(io_loop, cluster):
    a, b, proxy = await cluster()
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="sk-x", max_retries=0)
    response = await client.responses.create(model="llama3", input="hello",
                                             instructions="be brief")
    assert response.output_text == "tok0 tok1 tok2 tok3 tok4 " and response.model == "llama3"
    kinds, deltas = [], []
    async for event in await client.responses.create(model=CHAT, input="hello", stream=True):
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "".join(deltas) == response.output_text
    with pytest.raises(openai.NotFoundError) as missing:
        await client.responses.create(model="nope", input="x")
    assert missing.value.body["type"] == "not_found_error"
    a.die_after = b.die_after = 5
    with pytest.raises(openai.APIError, match="failed mid-response"):
        async for _ in await client.responses.create(model=CHAT, input="x", stream=True):
            pass
    await client.close()


# ---------------------------------------------------------------- native fields


async def test_ollama_client_think_and_tool_calls_through_the_proxy(io_loop, cluster):
    a, b, proxy = await cluster()
    client = ollama.AsyncClient(host=proxy.url)
    parts = [p async for p in await client.chat(CHAT, MESSAGE, think=True, stream=True)]
    assert "".join(p.message.thinking or "" for p in parts) == "think0 think1 "
    assert "".join(p.message.content for p in parts) == "tok0 tok1 tok2 tok3 tok4 "
    calls = [c async for p in await client.chat(CHAT, MESSAGE, tools=[WEATHER], stream=True)
             for c in p.message.tool_calls or []]
    assert [(c.function.name, c.function.arguments) for c in calls] == [
        ("get_weather", {"city": "tok0"})]
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    shaped = await client.generate(CHAT, "x", format=schema, keep_alive="1m", think=True,
                                   logprobs=True, top_logprobs=1, images=["aGk="])
    assert json.loads(shaped.response) == {"n": 0} and shaped.thinking
    sent = served(a, b, path="/api/generate")[0].json
    assert sent["format"] == schema and sent["keep_alive"] == "1m" and sent["images"] == ["aGk="]
    assert sent["logprobs"] is True and sent["top_logprobs"] == 1 and sent["think"] is True
    await client.embed(CHAT, ["a"], truncate=False, dimensions=4)
    sent = served(a, b, path="/api/embed")[0].json
    assert sent["truncate"] is False and sent["dimensions"] == 4


# ---------------------------------------------------------------- blobs


async def test_create_from_a_blob_on_every_node(io_loop, cluster, tmp_path):
    a, b, proxy = await cluster()
    data = b"GGUF" + bytes(range(256)) * 4096  # 1 MiB: many chunks
    path = tmp_path / "model.gguf"
    path.write_bytes(data)
    client = await admin_client(proxy)
    digest = await client.create_blob(path)
    assert digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert a.blobs[digest] == data and b.blobs[digest] == data
    token = await login(proxy)
    assert (await call(proxy, "HEAD", f"/api/blobs/{digest}", token=token)).code == 200
    await client.create(model="mine", files={"model.gguf": digest})
    assert "mine:latest" in [m.model for m in (await client.list()).models]
    answer = await client.chat("mine", MESSAGE)  # routable at once
    assert answer.message.content


async def test_blob_errors(io_loop, cluster, tmp_path):
    a, b, proxy = await cluster()
    data = b"GGUF" + b"x" * 100_000
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    token = await login(proxy)
    anonymous = await call(proxy, "POST", f"/api/blobs/{digest}", raw=data)
    assert anonymous.code == 401 and not a.requests_to(f"/api/blobs/{digest}")
    assert (await call(proxy, "HEAD", f"/api/blobs/{digest}")).code == 401
    assert (await call(proxy, "HEAD", f"/api/blobs/{digest}", token=token)).code == 404
    assert (await call(proxy, "POST", "/api/blobs/sha256:xyz", raw=data,
                       token=token)).code == 400
    wrong = await call(proxy, "POST", f"/api/blobs/sha256:{'0' * 64}", raw=data, token=token)
    assert wrong.code == 400 and wrong.json["error"].startswith("digest mismatch")
    assert not a.blobs and not b.blobs  # the aborted upload was stored nowhere
    b.fail_status = 500
    b.fail_message = "disk full"
    failed = await call(proxy, "POST", f"/api/blobs/{digest}", raw=data, token=token)
    assert failed.code == 502
    assert "failed on 1 of 2 node(s)" in failed.json["error"]
    assert f"{proxy.node(b).name}: node answered 500: disk full" in failed.json["error"]
    assert digest in a.blobs and digest not in b.blobs
    missing = await call(proxy, "HEAD", f"/api/blobs/{digest}", token=token)
    assert missing.code == 404
    with pytest.raises(ollama.ResponseError):
        await (await admin_client(proxy)).create(model="mine", files={"m.gguf": digest})
