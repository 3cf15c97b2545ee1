"""The fake Ollama node itself: the whole suite and the benchmarks trust it, so its
wire format and its misbehaviour knobs are checked here against the real clients."""
from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import signal
import struct
import subprocess
import sys
import time
import urllib.request

import httpx
import ollama
import openai
import pytest

from tests.helpers import CHAT, EMBED, fetch, running, wait_for

TEXT = "tok0 tok1 tok2 tok3 tok4 "
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


async def exchange(port: int, path: str, body: dict) -> tuple[bytes, list[bytes]]:
    """POST over a bare socket; the response head and its HTTP chunks exactly as framed
    on the wire (HTTP clients may merge chunks that arrive together)."""
    payload = json.dumps(body).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                 b"Content-Length: %d\r\n\r\n" % (path.encode(), len(payload)) + payload)
    data = await reader.read()
    writer.close()
    head, rest = data.split(b"\r\n\r\n", 1)
    chunks = []
    while True:
        size, rest = rest.split(b"\r\n", 1)
        if int(size, 16) == 0:
            return head, chunks
        chunks.append(rest[:int(size, 16)])
        assert rest[int(size, 16):int(size, 16) + 2] == b"\r\n"
        rest = rest[int(size, 16) + 2:]


# ---------------------------------------------------------------- plain endpoints


async def test_root_version_and_plain_text_errors(io_loop):
    async with running(version="0.11.8") as (node, _, _):
        root = await fetch(node.url + "/")
        assert root.code == 200 and root.body == b"Ollama is running"
        assert root.headers["Content-Type"] == "text/plain; charset=utf-8"
        head = await fetch(node.url + "/", "HEAD")
        assert head.body == b"" and head.headers["Content-Length"] == "17"
        version = await fetch(node.url + "/api/version")
        assert version.headers["Content-Type"] == "application/json; charset=utf-8"
        assert version.headers["Content-Length"] == str(len(version.body))
        assert json.loads(version.body) == {"version": "0.11.8"}
        assert (await fetch(node.url + "/api/version", "HEAD")).code == 200
        for method, path, status, text in [("GET", "/nope", 404, b"404 page not found"),
                                           ("POST", "/v1/nope", 404, b"404 page not found"),
                                           ("GET", "/api/chat", 405, b"405 method not allowed"),
                                           ("DELETE", "/api/generate", 405,
                                            b"405 method not allowed")]:
            response = await fetch(node.url + path, method)
            assert (response.code, response.body) == (status, text)
            assert response.headers["Content-Type"] == "text/plain"
        assert [r.path for r in node.requests][-2:] == ["/api/chat", "/api/generate"]


async def test_list_ps_show(io_loop):
    async with running() as (node, client, _):
        listed = await client.list()
        assert [m.model for m in listed.models] == [CHAT, EMBED]
        for m in listed.models:
            assert len(m.digest) == 64 and int(m.digest, 16) >= 0
            assert m.size > 0 and m.modified_at.utcoffset() is not None
            assert m.details.format == "gguf" and m.details.families == [m.details.family]
        raw = json.loads((await fetch(node.url + "/api/tags")).body)["models"][0]
        assert raw["name"] == raw["model"] == CHAT
        assert (await client.ps()).models == []
        await client.generate(model="llama3", prompt="hi", keep_alive=-1)
        await client.embed(model="nomic-embed-text", input="x")
        ps = (await client.ps()).models
        assert [m.model for m in ps] == [CHAT, EMBED]  # the longest kept first
        assert ps[0].expires_at.year > 2200 and ps[0].size_vram == ps[0].size
        assert ps[0].context_length > 0
        shown = await client.show("LLaMA3")
        assert shown.details.family == "llama" and "completion" in shown.capabilities
        assert (await client.show(EMBED)).capabilities == ["embedding"]
        with pytest.raises(ollama.ResponseError) as err:
            await client.show("nope")
        assert (err.value.status_code, err.value.error) == (404, "model 'nope:latest' not found")


# ---------------------------------------------------------------- generation


async def test_generate_stream_and_not(io_loop):
    async with running() as (node, client, _):
        whole = await client.generate(model="llama3", prompt="say hi")
        assert whole.model == "llama3" and whole.response == TEXT
        assert whole.done and whole.done_reason == "stop" and whole.context
        assert whole.eval_count == 5 and whole.prompt_eval_count == 2
        assert isinstance(whole.total_duration, int) and whole.total_duration > 0
        parts = [p async for p in await client.generate(model=CHAT, prompt="hi", stream=True)]
        assert [p.response for p in parts] == [f"tok{i} " for i in range(5)] + [""]
        assert [p.done for p in parts] == [False] * 5 + [True]
        assert parts[-1].done_reason == "stop" and parts[-1].model == CHAT
        assert node.requests_to("/api/generate")[-1].chunks_sent == 6
        load = await client.generate(model="llama3")
        assert (load.done, load.done_reason, load.response) == (True, "load", "")
        unload = await client.generate(model="llama3", keep_alive=0)
        assert unload.done_reason == "unload" and node.loaded == []


async def test_chat_stream_and_not(io_loop):
    async with running(chunks=3) as (node, client, _):
        messages = [{"role": "user", "content": "hello there"}]
        whole = await client.chat(model="llama3", messages=messages)
        assert whole.message.role == "assistant" and whole.message.content == "tok0 tok1 tok2 "
        assert whole.done_reason == "stop" and whole.prompt_eval_count == 2
        parts = [p async for p in await client.chat(model=CHAT, messages=messages, stream=True)]
        assert [p.message.content for p in parts] == ["tok0 ", "tok1 ", "tok2 ", ""]
        assert parts[-1].done and parts[-1].eval_count == 3
        load = await client.chat(model="llama3", messages=[])
        assert load.done_reason == "load" and node.loaded == [CHAT]


async def test_native_wire_format(io_loop):
    async with running() as (node, _, _):
        head, lines = await exchange(node.port, "/api/chat", {
            "model": "llama3", "messages": [{"role": "user", "content": "x"}]})
        assert b"\r\nContent-Type: application/x-ndjson\r\n" in head
        assert b"\r\nTransfer-Encoding: chunked" in head and b"Content-Length" not in head
        # One line per chunk: each was written and flushed on its own.
        assert all(c.endswith(b"\n") and c.count(b"\n") == 1 for c in lines) and len(lines) == 6
        final = json.loads(lines[-1])
        assert final["message"] == {"role": "assistant", "content": ""} and "context" not in final
        single = await fetch(node.url + "/api/generate", "POST",
                             {"model": "llama3", "prompt": "x", "stream": False})
        assert single.headers["Content-Type"] == "application/json; charset=utf-8"
        assert single.headers["Content-Length"] == str(len(single.body))
        for path, body, status, error in [
                ("/api/generate", b"", 400, "missing request body"),
                ("/api/generate", b'{"model": "llama3", "keep_alive": "10"}', 400,
                 'time: missing unit in duration "10"'),
                ("/api/generate", b'{"model": "missing"}', 404, "model 'missing' not found"),
                ("/api/generate", b'{}', 404, "model '' not found"),
                ("/api/chat", b'{"messages": []}', 400, "model is required"),
                ("/api/embed", b'{"model": "x", "input": "a"}', 404,
                 'model "x" not found, try pulling it first'),
                ("/api/embeddings", b'{"model": "x", "prompt": "a"}', 404,
                 'model "x" not found, try pulling it first')]:
            response = await fetch(node.url + path, "POST", body)
            assert (response.code, json.loads(response.body)) == (status, {"error": error})
            assert response.headers["Content-Type"] == "application/json; charset=utf-8"
        bad = await fetch(node.url + "/api/generate", "POST", b"{nope")
        assert bad.code == 400 and isinstance(json.loads(bad.body)["error"], str)


async def test_embed_and_legacy_embeddings(io_loop):
    async with running(embed_dim=16) as (node, client, _):
        result = await client.embed(model="nomic-embed-text", input=["one", "two"])
        assert result.model == "nomic-embed-text" and len(result.embeddings) == 2
        for vector in result.embeddings:
            assert len(vector) == 16 and math.isclose(math.hypot(*vector), 1.0)
        assert result.embeddings[0] != result.embeddings[1]
        again = await client.embed(model=EMBED, input="one")
        assert again.embeddings == result.embeddings[:1]  # deterministic from the text
        short = await client.embed(model=EMBED, input="one", dimensions=4)
        assert len(short.embeddings[0]) == 4
        assert (await client.embed(model=EMBED, input=[])).embeddings == []
        legacy = (await client.embeddings(model=EMBED, prompt="one")).embedding
        assert len(legacy) == 16 and not math.isclose(math.hypot(*legacy), 1.0)
        scale = math.hypot(*legacy)
        assert all(math.isclose(a / scale, b) for a, b in zip(legacy, result.embeddings[0]))
        with pytest.raises(ollama.ResponseError) as err:
            await client.embed(model="missing", input="x")
        assert err.value.status_code == 404


async def test_pull_create_push_copy_delete(io_loop):
    async with running((CHAT,)) as (node, client, _):
        progress = [p async for p in await client.pull("mistral", stream=True)]
        statuses = [p.status for p in progress]
        assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
        assert statuses[-3:-1] == ["verifying sha256 digest", "writing manifest"]
        layers = [p for p in progress if p.status.startswith("pulling ") and p.digest]
        assert layers and all(p.status == "pulling " + p.digest[7:19] and
                              0 < p.completed <= p.total for p in layers)
        assert node.models == [CHAT, "mistral:latest"]
        assert (await client.pull("qwen3:8b")).status == "success"
        created = [p.status async for p in await client.create("mine", from_=CHAT, stream=True)]
        assert created[-1] == "success" and "mine:latest" in node.models
        pushed = [p.status async for p in await client.push("mine", stream=True)]
        assert pushed[0] == "retrieving manifest" and pushed[-1] == "success"
        assert (await client.copy("mine", "yours")).status == "success"
        assert (await client.delete("yours")).status == "success"
        assert node.models == [CHAT, "mistral:latest", "qwen3:8b", "mine:latest"]
        with pytest.raises(ollama.ResponseError) as err:
            await client.delete("yours")
        assert err.value.status_code == 404
        deleted = await fetch(node.url + "/api/delete", "DELETE", {"model": "mine"})
        assert (deleted.code, deleted.body) == (200, b"")
        assert "Content-Type" not in deleted.headers
        assert node.requests_to("/api/delete")[-1].json == {"model": "mine"}


# ---------------------------------------------------------------- OpenAI-compatible


async def test_openai_chat_and_completions(io_loop):
    async with running() as (node, _, client):
        messages = [{"role": "user", "content": "hi"}]
        whole = await client.chat.completions.create(model="llama3", messages=messages)
        assert whole.object == "chat.completion" and whole.model == "llama3"
        assert whole.choices[0].message.content == TEXT
        assert whole.choices[0].finish_reason == "stop" and whole.usage.total_tokens == 6
        stream = await client.chat.completions.create(
            model="llama3", messages=messages, stream=True,
            stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == TEXT
        assert chunks[-2].choices[0].finish_reason == "stop"
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
        text = await client.completions.create(model=CHAT, prompt="once")
        assert text.object == "text_completion" and text.choices[0].text == TEXT
        parts = [c.choices[0].text async for c in
                 await client.completions.create(model=CHAT, prompt="once", stream=True)]
        assert "".join(parts) == TEXT and parts[-1] == ""
        with pytest.raises(openai.NotFoundError) as err:
            await client.chat.completions.create(model="missing", messages=messages)
        assert err.value.body == {"message": "model 'missing' not found",
                                  "type": "not_found_error", "param": None, "code": None}
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model="llama3", messages=[])


async def test_openai_sse_wire_format(io_loop):
    async with running(chunks=2) as (node, _, _):
        body = {"model": "llama3", "messages": [{"role": "user", "content": "x"}],
                "stream": True}
        head, events = await exchange(node.port, "/v1/chat/completions", body)
        assert b"\r\nContent-Type: text/event-stream\r\n" in head
        assert all(e.startswith(b"data: ") and e.endswith(b"\n\n") for e in events)
        assert events[-1] == b"data: [DONE]\n\n" and len(events) == 4  # 2 tokens, finish, done
        assert json.loads(events[2][6:])["choices"][0] == {
            "index": 0, "delta": {}, "finish_reason": "stop"}
        del body["stream"]  # absent means false on /v1
        not_streamed = await fetch(node.url + "/v1/chat/completions", "POST", body)
        assert not_streamed.headers["Content-Type"] == "application/json; charset=utf-8"


async def test_openai_embeddings_and_models(io_loop):
    async with running() as (node, native, client):
        expected = (await native.embed(model=EMBED, input=["a", "b"])).embeddings
        default = await client.embeddings.create(model=EMBED, input=["a", "b"])  # base64
        assert node.requests_to("/v1/embeddings")[-1].json["encoding_format"] == "base64"
        floats = await client.embeddings.create(model=EMBED, input="a", encoding_format="float")
        for got, want in zip([d.embedding for d in default.data], expected):
            assert all(math.isclose(g, w, rel_tol=1e-6) for g, w in zip(got, want))
        assert floats.data[0].embedding == expected[0] and floats.usage.prompt_tokens == 1
        raw = json.loads((await fetch(node.url + "/v1/embeddings", "POST", {
            "model": EMBED, "input": "a", "encoding_format": "base64"})).body)
        packed = base64.b64decode(raw["data"][0]["embedding"])
        assert struct.unpack(f"<{len(packed) // 4}f", packed)[0] == pytest.approx(expected[0][0])
        bad = await fetch(node.url + "/v1/embeddings", "POST", {"model": EMBED, "input": []})
        assert bad.code == 400 and json.loads(bad.body)["error"]["type"] == "invalid_request_error"
        assert [m.id for m in (await client.models.list()).data] == [CHAT, EMBED]
        model = await client.models.retrieve(CHAT)
        assert (model.id, model.object, model.owned_by) == (CHAT, "model", "library")
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve("missing")
        node.models = []
        empty = json.loads((await fetch(node.url + "/v1/models")).body)
        assert empty == {"object": "list", "data": None}


# ---------------------------------------------------------------- misbehaviour


async def test_fail_status_for_model_requests_only(io_loop):
    async with running() as (node, native, compat):
        node.fail_status, node.fail_message = 503, "busy"
        with pytest.raises(ollama.ResponseError) as err:
            await native.generate(model="llama3", prompt="x")
        assert (err.value.status_code, err.value.error) == (503, "busy")
        with pytest.raises(ollama.ResponseError) as err:
            await native.embed(model=EMBED, input="x")
        assert err.value.status_code == 503
        with pytest.raises(openai.APIStatusError) as err:
            await compat.chat.completions.create(
                model="llama3", messages=[{"role": "user", "content": "x"}])
        assert err.value.status_code == 503
        assert err.value.body == {"message": "busy", "type": "api_error", "param": None,
                                  "code": None}
        assert len((await native.list()).models) == 2  # listings still work
        node.reset()
        assert (await native.generate(model="llama3", prompt="x")).done


async def test_die_after_truncates_the_stream(io_loop):
    async with running(chunks=5) as (node, client, compat):
        node.die_after = 2
        seen = []
        with pytest.raises(httpx.RemoteProtocolError):
            async for part in await client.generate(model="llama3", prompt="x", stream=True):
                seen.append(part.response)
        assert seen == ["tok0 ", "tok1 "]
        record = node.requests_to("/api/generate")[0]
        assert record.chunks_sent == 2
        assert record.finished_at is None and record.client_closed_at is None
        with pytest.raises(openai.APIConnectionError):
            async for _ in await compat.chat.completions.create(
                    model="llama3", messages=[{"role": "user", "content": "x"}], stream=True):
                pass
        with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
            await client.generate(model="llama3", prompt="x")  # stream false: no answer at all
        assert node.requests_to("/api/generate")[-1].chunks_sent == 2
        node.die_after = 0  # dies before a single byte, headers included
        with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
            async for _ in await client.generate(model="llama3", prompt="x", stream=True):
                pass


async def test_error_after_ends_with_an_in_band_error(io_loop):
    async with running() as (node, client, compat):
        node.error_after, node.fail_message = 1, "runner crashed"
        parts = []
        with pytest.raises(ollama.ResponseError) as err:
            async for part in await client.generate(model="llama3", prompt="x", stream=True):
                parts.append(part)
        assert (err.value.status_code, err.value.error) == (-1, "runner crashed")
        assert len(parts) == 1
        with pytest.raises(openai.APIError, match="runner crashed"):
            async for _ in await compat.chat.completions.create(
                    model="llama3", messages=[{"role": "user", "content": "x"}], stream=True):
                pass
        with pytest.raises(ollama.ResponseError) as err:
            await client.generate(model="llama3", prompt="x")
        assert err.value.status_code == 500


async def test_client_leaving_during_first_byte_delay_is_recorded_at_once(io_loop):
    async with running(first_byte_delay=10) as (node, _, _):
        payload = json.dumps({"model": "llama3", "prompt": "x"}).encode()
        _, writer = await asyncio.open_connection("127.0.0.1", node.port)
        writer.write(b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                     % len(payload) + payload)
        await wait_for(lambda: node.requests_to("/api/generate"))
        await asyncio.sleep(0.2)
        record = node.requests_to("/api/generate")[0]
        assert record.client_closed_at is None
        left_at = time.monotonic()
        writer.close()
        await wait_for(lambda: record.client_closed_at is not None, timeout=1)
        assert 0 <= record.client_closed_at - left_at < 0.1
        assert record.chunks_sent == 0 and record.finished_at is None


async def test_client_leaving_mid_stream_stops_the_node(io_loop):
    async with running(chunks=100, chunk_delay=0.05) as (node, client, _):
        stream = await client.generate(model="llama3", prompt="x", stream=True)
        assert (await anext(stream)).response == "tok0 "
        left_at = time.monotonic()
        await stream.aclose()
        record = node.requests_to("/api/generate")[0]
        await wait_for(lambda: record.client_closed_at is not None, timeout=1)
        assert record.client_closed_at - left_at < 0.1
        sent = record.chunks_sent
        await asyncio.sleep(0.2)
        assert record.chunks_sent == sent < 5 and record.finished_at is None


async def test_chunks_are_flushed_one_by_one_with_chunk_delay_gaps(io_loop):
    async with running(chunks=3, chunk_delay=0.15) as (node, _, _):
        chunks: list = []
        started = time.monotonic()
        await fetch(node.url + "/api/generate", "POST", {"model": "llama3", "prompt": "x"},
                    chunks)
        assert [json.loads(c)["done"] for _, c in chunks] == [False, False, False, True]
        times = [started] + [t for t, _ in chunks]
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert gaps[0] < 0.1 and all(0.12 < g < 0.3 for g in gaps[1:])
        node.first_byte_delay = 0.3
        quiet: list = []
        started = time.monotonic()
        await fetch(node.url + "/api/generate", "POST",
                    {"model": "llama3", "prompt": "x", "stream": False}, quiet)
        # stream false: silent while loading and generating, then one body
        assert len(quiet) == 1 and quiet[0][0] - started > 0.3 + 3 * 0.15 - 0.05


async def test_stop_drops_connections_and_start_revives(io_loop):
    async with running(chunks=50, chunk_delay=0.05) as (node, client, _):
        port = node.port
        stream = await client.generate(model="llama3", prompt="x", stream=True)
        await anext(stream)
        await node.stop()
        with pytest.raises(httpx.RemoteProtocolError):
            async for _ in stream:
                pass
        record = node.requests_to("/api/generate")[0]
        assert record.client_closed_at is None and record.finished_at is None
        with pytest.raises(ConnectionError):
            await client.list()
        node.chunk_delay = 0
        await node.start(port=port)
        assert node.port == port and (await client.generate(model="llama3", prompt="x")).done


async def test_records_and_reset(io_loop):
    async with running(chunks=2) as (node, _, _):
        client = ollama.AsyncClient(host=node.url, headers={"X-Custom": "yes"})
        await client.generate(model="llama3", prompt="x", keep_alive="5m")
        await client.close()
        record = node.requests_to("/api/generate")[0]
        assert record.method == "POST" and record.headers["x-custom"] == "yes"
        assert record.json["keep_alive"] == "5m" and json.loads(record.body) == record.json
        assert record.started_at <= record.finished_at and record.chunks_sent == 3
        node.chunks, node.die_after, node.fail_status = 9, 1, 500
        node.reset()
        assert node.requests == [] and node.loaded == []
        assert (node.chunks, node.die_after, node.fail_status) == (2, None, None)
        assert node.models == [CHAT, EMBED]


def test_command_line_serves_until_terminated() -> None:
    command = [sys.executable, "-m", "tests.fakes.fake_ollama", "--port", "0", "--models",
               "llama3:latest,nomic-embed-text:latest", "--chunks", "20", "--chunk-delay", "0.001"]
    with subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True) as process:
        try:
            line = process.stdout.readline()
            assert line.startswith("listening on http://127.0.0.1:")
            url = line.split()[-1]
            with urllib.request.urlopen(url + "/api/tags", timeout=5) as response:
                names = [m["name"] for m in json.load(response)["models"]]
            assert names == ["llama3:latest", "nomic-embed-text:latest"]
            request = urllib.request.Request(url + "/api/generate", data=json.dumps(
                {"model": "llama3", "prompt": "x"}).encode())
            with urllib.request.urlopen(request, timeout=5) as response:
                assert len(response.read().splitlines()) == 21
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=5) == 0
        finally:
            if process.poll() is None:
                process.kill()
