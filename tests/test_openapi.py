"""The OpenAPI document, the offline doc UIs, and a bounded fuzz run of
schemathesis against every documented operation."""
from __future__ import annotations

import asyncio
import inspect
import os
import re
import sys

from openapi_spec_validator import validate

from aivonx.app import documented_routes
from tests.helpers import call, login

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUZZ_SECONDS = 35
# Every answer must be one the document describes: status, content type,
# body schema; methods it does not list answer 405 with `Allow`.
CHECKS = ",".join(("not_a_server_error", "status_code_conformance", "content_type_conformance",
                   "response_schema_conformance", "unsupported_method",
                   "allow_header_conformance"))

HOOKS = '''
import schemathesis

@schemathesis.hook
def before_call(ctx, case, **kwargs):
    # Keep the one real node: draining or deleting it would make every
    # later model operation answer 503 "no node is available", by design.
    # Every phase calls this (the coverage phase picks id 1, a boundary).
    if str((case.path_parameters or {}).get("node_id")) == "{node_id}":
        case.path_parameters["node_id"] = 2 ** 62
'''
# The fuzzer adds nodes that cannot be reached and may name them in a pull,
# which then answers 502 as documented; no other 5xx is acceptable.
CONFIG = '''
[[operations]]
include-path = "/api/proxy/pull"
checks.not_a_server_error.expected-statuses = ["2xx", "3xx", "4xx", "502"]
'''


async def test_schema_is_valid_openapi_covering_every_endpoint(io_loop, make_proxy):
    proxy = await make_proxy()
    answer = await call(proxy, "GET", "/api/schema")
    assert answer.code == 200 and answer.headers["Content-Type"].startswith("application/json")
    spec = answer.json
    validate(spec)
    assert spec["openapi"].startswith("3.")
    assert spec["components"]["securitySchemes"]["bearerAuth"] == {"type": "http",
                                                                   "scheme": "bearer"}
    documented = {(path, method) for path, ops in spec["paths"].items() for method in ops}
    for pattern, handler, _ in documented_routes(None):
        for method in ("get", "post", "put", "patch", "delete"):
            if method in handler.__dict__:
                # A path parameter is named after the method's argument.
                arguments = list(inspect.signature(handler.__dict__[method]).parameters)[1:]
                path = re.sub(r"\(\?P<(\w+)>[^)]*\)", r"{\1}", pattern)
                path = re.sub(r"\([^)]*\)", "{%s}" % (arguments or ["_"])[0], path)
                assert (path, method) in documented, (path, method)
                operation = spec["paths"][path][method]
                assert operation["responses"] and operation["summary"]
                protected = getattr(handler.__dict__[method], "__wrapped__", None)
                if protected is not None:
                    assert operation["security"] == [{"bearerAuth": []}], (path, method)
                    assert "401" in operation["responses"], (path, method)
    assert {"/api/proxy/keys", "/api/proxy/keys/{key_id}", "/api/proxy/usage",
            "/api/proxy/audit"} <= set(spec["paths"])
    assert {"/api/account/login", "/api/proxy/nodes/{node_id}", "/api/proxy/pull",
            "/api/pull"} <= set(spec["paths"])
    # The relayed API, new dialects included, is documented too.
    assert {"post"} <= set(spec["paths"]["/v1/messages"]) and "/v1/responses" in spec["paths"]
    assert {"get", "head"} <= set(spec["paths"]["/api/tags"])
    node_input = spec["components"]["schemas"]["NodeInput"]
    assert node_input["required"] == ["address"]
    assert node_input["properties"]["port"]["maximum"] == 65535
    slots, weight = node_input["properties"]["slots"], node_input["properties"]["weight"]
    assert (slots["type"], slots["minimum"], slots["maximum"], slots["default"]) == (
        "integer", 1, 1024, 4)
    assert (weight["type"], weight["minimum"], weight["exclusiveMinimum"],
            weight["maximum"]) == ("number", 0, True, 100)
    assert "404" in spec["paths"]["/api/create"]["post"]["responses"]
    for method in ("get", "put", "patch", "delete"):
        (parameter,) = spec["paths"]["/api/proxy/nodes/{node_id}"][method]["parameters"]
        assert parameter["schema"] == {"type": "integer", "format": "int64", "minimum": 1}
    node = spec["components"]["schemas"]["Node"]["properties"]
    assert {"slots", "weight"} <= set(node)


async def test_swagger_ui_and_redoc_are_served_offline(io_loop, make_proxy):
    proxy = await make_proxy()
    for path, asset in (("/swagger", "vendor/swagger-ui/swagger-ui-bundle.js"),
                        ("/redoc", "vendor/redoc/redoc.standalone.js")):
        answer = await call(proxy, "GET", path)
        assert answer.code == 200
        assert answer.headers["Content-Type"].startswith("text/html")
        assert answer.headers["Content-Security-Policy"] == "img-src 'self' data:"
        page = answer.text
        assert '<meta charset="utf-8">' in page and '"/api/schema"' in page
        assert "http://" not in page and "https://" not in page  # nothing from a CDN
        src = re.search(r'src="(/static/' + re.escape(asset) + r'[^"]*)"', page).group(1)
        script = await call(proxy, "GET", src)
        assert script.code == 200 and len(script.response.body) > 500_000
        assert "javascript" in script.headers["Content-Type"]
    assert "validatorUrl: null" in (await call(proxy, "GET", "/swagger")).text
    css = await call(proxy, "GET", "/static/vendor/swagger-ui/swagger-ui.css")
    assert css.code == 200


async def test_fuzzing_every_documented_operation_finds_no_server_error(
        io_loop, make_node, make_proxy, tmp_path):
    node = await make_node(["llama3:latest", "qwen3:8b"])
    # Nodes the fuzzer adds cannot be reached: fail fast. The real node's
    # probes get time to spare while the proxy is under load.
    proxy = await make_proxy([node], health_interval=3600, connect_timeout=0.5,
                             probe_timeout=3.0)
    token = await login(proxy)
    hooks = tmp_path / "fuzz_hooks.py"
    hooks.write_text(HOOKS.replace("{node_id}", str(proxy.node(node).id)))
    (tmp_path / "schemathesis.toml").write_text(CONFIG)
    # schemathesis runs as its own process: its pytest plugin and event loop
    # stay away from pytest-tornasync, and this loop keeps serving the proxy.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "schemathesis.cli", "run", f"{proxy.url}/api/schema",
        "--checks", CHECKS, "--max-time", str(FUZZ_SECONDS),
        "--phases", "examples,coverage,fuzzing", "--workers", "2", "--seed", "7",
        "--request-timeout", "10", "--header", f"Authorization: Bearer {token}",
        # Logout would revoke the fuzzer's own token; it is tested directly.
        "--exclude-path", "/api/account/logout",
        # The relayed endpoints' bodies are the nodes' to judge: fuzzed elsewhere.
        "--exclude-tag", "inference",
        "--suppress-health-check", "all", "--report-dir", str(tmp_path / "report"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "SCHEMATHESIS_HOOKS": "fuzz_hooks", "NO_COLOR": "1",
             "PYTHONPATH": str(tmp_path)}, cwd=str(tmp_path))
    output, _ = await asyncio.wait_for(proc.communicate(), FUZZ_SECONDS + 20)
    text = output.decode(errors="replace")
    (tmp_path / "schemathesis.txt").write_text(text)  # the whole report, for a failure
    # A failure is what the API answered wrong; schemathesis' own internal
    # errors (it has some in its coverage phase) say nothing about the API.
    for trouble in ("Failures:", "Network Error", "Unresponsive Operation", "Unhealthy API"):
        assert trouble not in text, text[-6000:]
    generated = re.search(r"Test cases:\s+(\d+) generated", text)
    # About 800 cases on an idle machine; a loaded CI box runs far fewer in
    # the same time, but every operation gets its examples and coverage.
    assert generated and int(generated.group(1)) > 100, text[-3000:]
    # The proxy still works afterwards.
    assert (await call(proxy, "GET", "/api/proxy")).code == 200
