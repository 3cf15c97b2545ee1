"""Structured logs (--log-format json) and the X-Request-Id every
response carries."""
from __future__ import annotations

import json
import re

from tornado.httpclient import AsyncHTTPClient

from tests.helpers import start_aivonx

GENERATED = re.compile(r"[0-9a-f]{8}-[0-9a-f]+")


async def fetch(url: str, **kwargs):
    return await AsyncHTTPClient().fetch(url, raise_error=False, **kwargs)


async def test_every_response_carries_a_request_id(io_loop, make_node, make_proxy):
    node = await make_node(["llama3:latest"])
    proxy = await make_proxy([node])
    body = json.dumps({"model": "llama3", "prompt": "hi", "stream": False})
    generated = []
    for path, kwargs in [("/api/generate", {"method": "POST", "body": body}),
                         ("/api/generate", {"method": "POST", "body": "{"}),       # 400
                         ("/api/generate", {"method": "POST", "body": json.dumps(
                             {"model": "nope", "prompt": "hi"})}),                 # 404
                         ("/no/such/path", {}), ("/api/health", {}), ("/ui", {}),
                         ("/static/ui.css", {}), ("/metrics", {})]:
        response = await fetch(proxy.url + path, **kwargs)
        rid = response.headers.get("X-Request-Id", "")
        assert GENERATED.fullmatch(rid), (path, response.code, rid)
        generated.append(rid)
    assert len(set(generated)) == len(generated)
    # A caller's well-formed id is kept; a malformed or huge one is replaced.
    for incoming, kept in [("trace-42.a:b", True), ("a b", False), ("x" * 129, False),
                           ("é", False)]:
        response = await fetch(proxy.url + "/api/generate", method="POST", body=body,
                               headers={"X-Request-Id": incoming})
        assert response.code == 200
        assert (response.headers["X-Request-Id"] == incoming) is kept
        if not kept:
            assert GENERATED.fullmatch(response.headers["X-Request-Id"])


async def test_json_log_lines_with_access_fields(io_loop, make_node, tmp_path):
    node = await make_node(["llama3:latest"], name="gpu1")
    proc = await start_aivonx("--db", str(tmp_path / "j.db"), "--node", node.url,
                              "--log-format", "json", "--log-level", "debug")
    try:
        response = await fetch(proc.url + "/api/generate", method="POST",
                               headers={"X-Request-Id": "req-7"},
                               body=json.dumps({"model": "llama3", "prompt": "hi"}))
        assert response.code == 200 and response.headers["X-Request-Id"] == "req-7"
        await proc.wait_for(r'"request_id": "req-7"')
    finally:
        assert await proc.stop() == 0
    entries = [json.loads(line) for line in proc.lines]  # every line is one object
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    assert any(e["message"].startswith("Aivonx listening") and e["level"] == "info"
               for e in entries)
    (access,) = [e for e in entries if e.get("request_id") == "req-7"]
    assert access["logger"] == "aivonx.access" and access["level"] == "debug"
    assert {k: access[k] for k in ("method", "path", "status", "model")} == {
        "method": "POST", "path": "/api/generate", "status": 200, "model": "llama3:latest"}
    assert access["node"] == response.headers["X-Aivonx-Node"]
    assert access["key"] == "anonymous"  # inference_auth "open": no key needed
    assert isinstance(access["duration_ms"], float) and access["duration_ms"] >= 0
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", access["time"])


async def test_successful_requests_write_no_line_at_info(io_loop, make_node, tmp_path):
    node = await make_node(["llama3:latest"])
    proc = await start_aivonx("--db", str(tmp_path / "i.db"), "--node", node.url,
                              "--log-format", "json")
    try:
        before = len(proc.lines)
        for _ in range(3):
            assert (await fetch(proc.url + "/api/tags")).code == 200
        node.fail_status = 500
        await fetch(proc.url + "/api/generate", method="POST",
                    body=json.dumps({"model": "llama3", "prompt": "hi"}))
        warning = json.loads((await proc.wait_for(r'"status": 500', start=before)).string)
        assert warning["level"] == "warning" and warning["path"] == "/api/generate"
    finally:
        assert await proc.stop() == 0
    assert not any('"/api/tags"' in line for line in proc.lines[before:])
