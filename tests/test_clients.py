"""The real `ollama` and `openai` clients, through Aivonx, in front of two
nodes of which only one has the embedding model."""
from __future__ import annotations

import ollama
import openai
import pytest

CHAT = "llama3:latest"
EMBED = "nomic-embed-text:latest"


@pytest.fixture
def cluster(make_node, make_proxy):
    async def build():
        a = await make_node([CHAT, EMBED], version="0.12.3")
        b = await make_node([CHAT], version="0.11.8")
        proxy = await make_proxy([a, b])
        return a, b, proxy
    return build


async def test_generate_stream_and_not(io_loop, cluster):
    a, b, proxy = await cluster()
    client = ollama.AsyncClient(host=proxy.url)
    whole = await client.generate(model="llama3", prompt="hi", stream=False)
    assert whole.done and whole.model == "llama3"  # the client's string, echoed
    assert whole.response == "tok0 tok1 tok2 tok3 tok4 "
    parts = [p async for p in await client.generate(model="llama3", prompt="hi", stream=True)]
    assert len(parts) == 6 and parts[-1].done and parts[-1].done_reason == "stop"
    assert "".join(p.response for p in parts) == whole.response


async def test_chat_stream_and_not(io_loop, cluster):
    a, b, proxy = await cluster()
    client = ollama.AsyncClient(host=proxy.url)
    messages = [{"role": "user", "content": "hello"}]
    whole = await client.chat(model="LLaMA3:Latest", messages=messages)
    assert whole.message.role == "assistant" and whole.message.content
    parts = [p async for p in await client.chat(model=CHAT, messages=messages, stream=True)]
    assert parts[-1].done and "".join(p.message.content for p in parts) == whole.message.content


async def test_embed_goes_to_the_node_that_has_the_model(io_loop, cluster):
    a, b, proxy = await cluster()
    client = ollama.AsyncClient(host=proxy.url)
    for _ in range(4):
        result = await client.embed(model="nomic-embed-text", input=["one", "two"])
        assert len(result.embeddings) == 2
    legacy = await client.embeddings(model=EMBED, prompt="one")
    assert len(legacy.embedding) > 0
    assert len(a.requests_to("/api/embed")) == 4 and not b.requests_to("/api/embed")


async def test_list_ps_show_version(io_loop, cluster):
    a, b, proxy = await cluster()
    client = ollama.AsyncClient(host=proxy.url)
    listed = await client.list()
    assert sorted(m.model for m in listed.models) == sorted([CHAT, EMBED])
    for m in listed.models:
        assert m.digest and m.size and m.modified_at and m.details
    await client.generate(model=CHAT, prompt="warm up", stream=False)
    ps = await client.ps()
    assert [m.model for m in ps.models] == [CHAT]
    assert ps.models[0].size_vram is not None and ps.models[0].expires_at is not None
    shown = await client.show("library/llama3")
    assert shown.modelfile is not None
    with pytest.raises(ollama.ResponseError) as err:
        await client.show("nope")
    assert err.value.status_code == 404
    version = await client._request_raw("GET", "/api/version")
    assert version.json() == {"version": "0.11.8"}  # the oldest node's


async def test_unknown_model_is_404_stream_or_not(io_loop, cluster):
    a, b, proxy = await cluster()
    client = ollama.AsyncClient(host=proxy.url)
    for stream in (False, True):
        with pytest.raises(ollama.ResponseError) as err:
            result = await client.generate(model="missing", prompt="x", stream=stream)
            if stream:
                [p async for p in result]
        assert err.value.status_code == 404 and "not found" in err.value.error
    with pytest.raises(ollama.ResponseError) as err:
        await client.embed(model="missing", input="x")
    assert err.value.status_code == 404


async def test_openai_chat_embeddings_models(io_loop, cluster):
    a, b, proxy = await cluster()
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
    completion = await client.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "hi"}])
    assert completion.choices[0].message.content and completion.usage.total_tokens > 0
    stream = await client.chat.completions.create(
        model="llama3", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == completion.choices[0].message.content
    assert chunks[-1].usage is not None
    embeddings = await client.embeddings.create(model=EMBED, input=["a", "b", "c"])
    assert [d.index for d in embeddings.data] == [0, 1, 2]
    models = await client.models.list()
    assert sorted(m.id for m in models.data) == sorted([CHAT, EMBED])
    model = await client.models.retrieve(CHAT)
    assert model.id == CHAT and model.owned_by == "library"
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("missing")
    with pytest.raises(openai.NotFoundError) as err:
        await client.chat.completions.create(
            model="missing", messages=[{"role": "user", "content": "hi"}])
    assert err.value.body["type"] == "not_found_error"


async def test_openai_completions(io_loop, cluster):
    a, b, proxy = await cluster()
    client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
    completion = await client.completions.create(model=CHAT, prompt="once upon")
    assert completion.choices[0].text
    stream = await client.completions.create(model=CHAT, prompt="once upon", stream=True)
    text = "".join([c.choices[0].text async for c in stream if c.choices])
    assert text == completion.choices[0].text
