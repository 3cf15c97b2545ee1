"""Bad input gets Ollama's error shape and a 4xx, never a traceback."""
from __future__ import annotations


import pytest

from tests.helpers import call


@pytest.mark.parametrize("path,body,status,message", [
    ("/api/generate", b"", 400, "missing request body"),
    ("/api/generate", b"{not json", 400, "invalid JSON"),
    ("/api/generate", b"[1, 2]", 400, "must be a JSON object"),
    ("/api/generate", b'{"prompt": "x"}', 400, "model is required"),
    ("/api/generate", b'{"model": 42}', 400, "expected a string"),
    ("/api/generate", b'{"model": "llama3", "stream": "yes"}', 400, "'stream'"),
    ("/api/chat", b'{"model": "llama3", "messages": "hi"}', 400, "'messages'"),
    ("/api/embed", b'{"model": "llama3", "input": 5}', 400, "'input'"),
    ("/api/generate", b'{"model": "a//b"}', 400, "invalid model name"),
    ("/api/generate", b'{"model": "' + b"x" * 5000 + b'"}', 400, "invalid model name"),
    ("/api/generate", b'{"model": "llama3", "prompt": "\xff\xfe"}', 400, "UTF-8"),
    ("/api/generate", b"[" * 100000 + b"]" * 100000, 400, "nested too deeply"),
    # Above 256 KiB the body's top level is scanned rather than parsed.
    ("/api/generate", b'{"model": "llama3", "x": ' + b"[" * 200000 + b"]" * 200000 + b"}",
     400, "nested too deeply"),
    ("/api/generate", b'{"model": "llama3", "x": [' + b"0," * 200000 + b"0}", 400,
     "mismatched brackets"),
    ("/api/nope", b"{}", 404, "404 page not found"),
    ("/definitely/unknown", None, 404, "404 page not found"),
])
async def test_bad_requests_get_ollama_errors(io_loop, make_node, make_proxy, path, body,
                                              status, message):
    proxy = await make_proxy([await make_node()])
    method = "GET" if body is None else "POST"
    response = await call(proxy, method, path, raw=body)
    assert response.code == status
    assert response.headers["Content-Type"].startswith("application/json")
    error = response.json["error"]
    assert isinstance(error, str) and message in error
    assert "Traceback" not in error


async def test_wrong_method_is_405_in_ollama_shape(io_loop, make_node, make_proxy):
    proxy = await make_proxy([await make_node()])
    for method, path, allow in [("GET", "/api/chat", "POST"), ("DELETE", "/api/generate", "POST"),
                                ("POST", "/api/tags", "GET, HEAD"),
                                ("PUT", "/v1/chat/completions", "POST"),
                                ("TRACE", "/api/proxy/config", "GET, PATCH, PUT"),
                                ("POST", "/api/proxy/nodes/1", "GET, DELETE, PATCH, PUT")]:
        response = await call(proxy, method, path, raw=b"{}" if method != "GET" else None)
        assert response.code == 405, (method, path)
        assert response.headers["Allow"] == allow, (method, path)  # RFC 9110
        error = response.json["error"]
        if path.startswith("/v1/"):
            error = error["message"]  # OpenAI's shape on the OpenAI API
        assert error == "405 method not allowed"


async def test_openai_errors_in_openai_shape(io_loop, make_node, make_proxy):
    proxy = await make_proxy([await make_node()])
    response = await call(proxy, "POST", "/v1/chat/completions", raw=b"{oops")
    assert response.code == 400
    error = response.json["error"]
    assert error["type"] == "invalid_request_error" and error["param"] is None


async def test_root_version_and_head(io_loop, make_node, make_proxy):
    proxy = await make_proxy([await make_node()])
    root = await call(proxy, "GET", "/")
    assert root.response.body == b"Ollama is running"
    assert root.headers["Content-Type"] == "text/plain; charset=utf-8"
    head = await call(proxy, "HEAD", "/")
    assert head.code == 200 and head.response.body == b""
    version = await call(proxy, "GET", "/api/version")
    assert version.json == {"version": "0.12.3"}
    health = await call(proxy, "GET", "/api/health")
    assert health.json == {"status": "healthy"}
