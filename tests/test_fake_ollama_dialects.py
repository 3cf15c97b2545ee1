"""The fake node's Anthropic Messages and OpenAI Responses dialects, its blobs and the
newer native fields, checked against the real anthropic, openai and ollama clients."""
from __future__ import annotations

import hashlib
import json

import anthropic
import ollama
import openai
import pytest

from tests.helpers import CHAT, WEATHER, fetch, running

def sse(body: bytes) -> list[tuple[str, dict]]:
    """(event name, data) of each SSE event in a body."""
    events = []
    for block in body.decode().split("\n\n"):
        if block:
            lines = dict(line.split(": ", 1) for line in block.split("\n"))
            events.append((lines["event"], json.loads(lines["data"])))
    return events


def claude(node) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=node.url, api_key="sk-ant-x", max_retries=0)


async def test_messages_create_and_stream(io_loop):
    async with running(chunks=3) as (node, _, _compat):
        client = claude(node)
        message = await client.messages.create(
            model="llama3", max_tokens=64, messages=[{"role": "user", "content": "hi there"}])
        assert message.content[0].type == "text" and message.content[0].text == "tok0 tok1 tok2 "
        assert message.model == "llama3" and message.stop_reason == "end_turn"
        assert message.usage.output_tokens == 3 and message.id.startswith("msg_")
        async with client.messages.stream(
                model=CHAT, max_tokens=64,
                messages=[{"role": "user", "content": "hi"}]) as stream:
            texts = [text async for text in stream.text_stream]
            final = await stream.get_final_message()
        assert texts == ["tok0 ", "tok1 ", "tok2 "]
        assert final.stop_reason == "end_turn" and final.usage.output_tokens == 3
        response = await fetch(node.url + "/v1/messages", "POST", {
            "model": CHAT, "max_tokens": 9, "stream": True,
            "messages": [{"role": "user", "content": "hi"}]})
        assert response.headers["Content-Type"] == "text/event-stream"
        names = [name for name, _ in sse(response.body)]
        assert names == ["message_start", "content_block_start", *["content_block_delta"] * 3,
                         "content_block_stop", "message_delta", "message_stop"]
        await client.close()


async def test_messages_thinking_and_tool_use(io_loop):
    async with running(chunks=2) as (node, _, _compat):
        client = claude(node)
        message = await client.messages.create(
            model=CHAT, max_tokens=64, thinking={"type": "enabled", "budget_tokens": 10},
            messages=[{"role": "user", "content": "think"}])
        assert [b.type for b in message.content] == ["thinking", "text"]
        assert message.content[0].thinking == "think0 think1 "
        tool = {"name": "get_weather", "input_schema": WEATHER["function"]["parameters"]}
        async with client.messages.stream(
                model=CHAT, max_tokens=64, tools=[tool],
                messages=[{"role": "user", "content": "weather?"}]) as stream:
            final = await stream.get_final_message()
        assert final.stop_reason == "tool_use"
        assert final.content[0].type == "tool_use" and final.content[0].name == "get_weather"
        assert final.content[0].input == {"city": "tok0"}
        await client.close()


async def test_messages_errors_in_anthropic_shape(io_loop):
    async with running() as (node, _, _compat):
        client = claude(node)
        with pytest.raises(anthropic.NotFoundError) as missing:
            await client.messages.create(model="nope", max_tokens=5,
                                         messages=[{"role": "user", "content": "x"}])
        assert missing.value.body == {"type": "error", "error": {
            "type": "not_found_error", "message": "model 'nope' not found"}}
        with pytest.raises(anthropic.BadRequestError):
            await client.messages.create(model=CHAT, max_tokens=0,
                                         messages=[{"role": "user", "content": "x"}])
        node.error_after = 3
        with pytest.raises(anthropic.APIStatusError) as broken:
            async with client.messages.stream(
                    model=CHAT, max_tokens=5,
                    messages=[{"role": "user", "content": "x"}]) as stream:
                async for _ in stream.text_stream:
                    pass
        assert broken.value.body["error"]["message"] == "injected failure"
        await client.close()


async def test_responses_create_and_stream(io_loop):
    async with running(chunks=3) as (node, _, compat):
        response = await compat.responses.create(model="llama3", input="hi there")
        assert response.output_text == "tok0 tok1 tok2 " and response.status == "completed"
        assert response.model == "llama3" and response.usage.output_tokens == 3
        stream = await compat.responses.create(model=CHAT, input="hi", stream=True)
        kinds, deltas = [], []
        async for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        assert kinds[:2] == ["response.created", "response.in_progress"]
        assert kinds[-1] == "response.completed" and deltas == ["tok0 ", "tok1 ", "tok2 "]
        called = await compat.responses.create(
            model=CHAT, input="weather?", reasoning={"effort": "low"},
            tools=[{"type": "function", "name": "get_weather",
                    "parameters": WEATHER["function"]["parameters"]}])
        assert [item.type for item in called.output] == ["reasoning", "function_call"]
        assert json.loads(called.output[1].arguments) == {"city": "tok0"}
        with pytest.raises(openai.NotFoundError):
            await compat.responses.create(model="nope", input="x")
        node.error_after = 4
        with pytest.raises(openai.APIError, match="injected failure"):
            async for _ in await compat.responses.create(model=CHAT, input="x", stream=True):
                pass


async def test_native_think_tools_format_logprobs(io_loop):
    async with running(chunks=2) as (node, native, _compat):
        parts = [p async for p in await native.chat(
            CHAT, [{"role": "user", "content": "hi"}], think=True, stream=True)]
        assert "".join(p.message.thinking or "" for p in parts) == "think0 think1 "
        assert "".join(p.message.content for p in parts) == "tok0 tok1 "
        generated = await native.generate(CHAT, "hi", think=True)
        assert generated.thinking == "think0 think1 " and generated.response == "tok0 tok1 "
        calls = [c async for p in await native.chat(
            CHAT, [{"role": "user", "content": "w?"}], tools=[WEATHER], stream=True)
            for c in p.message.tool_calls or []]
        assert [(c.function.name, c.function.arguments) for c in calls] == [
            ("get_weather", {"city": "tok0"})]
        answered = await native.chat(CHAT, [{"role": "user", "content": "w?"},
                                            {"role": "tool", "content": "sunny"}],
                                     tools=[WEATHER])
        assert answered.message.content == "tok0 tok1 " and not answered.message.tool_calls
        schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
        shaped = await native.chat(CHAT, [{"role": "user", "content": "x"}], format=schema)
        assert json.loads(shaped.message.content) == {"n": 0}
        assert node.requests[-1].json["format"] == schema
        scored = await native.generate(CHAT, "x", logprobs=True, top_logprobs=2)
        assert [lp.token for lp in scored.logprobs] == ["tok0 ", "tok1 "]
        assert len(scored.logprobs[0].top_logprobs) == 2


async def test_blobs_and_create_from_files(io_loop):
    async with running() as (node, native, _compat):
        data = b"GGUF" + bytes(range(256)) * 64
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        assert (await fetch(f"{node.url}/api/blobs/{digest}", "HEAD")).code == 404
        with pytest.raises(ollama.ResponseError) as missing:
            await native.create("mine", files={"m.gguf": digest})
        assert missing.value.status_code == 400
        wrong = await fetch(f"{node.url}/api/blobs/sha256:{'0' * 64}", "POST", data)
        assert wrong.code == 400 and b"digest mismatch" in wrong.body
        stored = await fetch(f"{node.url}/api/blobs/{digest}", "POST", data)
        assert stored.code == 201 and node.blobs[digest] == data
        assert (await fetch(f"{node.url}/api/blobs/{digest}", "POST", data)).code == 200
        assert (await fetch(f"{node.url}/api/blobs/{digest}", "HEAD")).code == 200
        assert (await fetch(f"{node.url}/api/blobs/nonsense", "HEAD")).code == 400
        await native.create("mine", files={"m.gguf": digest})
        assert "mine:latest" in [m.model for m in (await native.list()).models]
        for path in ("/api/tags", "/api/version"):
            assert (await fetch(node.url + path, "HEAD")).code == 200
        node.fail_status = 500
        assert (await fetch(f"{node.url}/api/blobs/{digest}", "POST", data)).code == 500
