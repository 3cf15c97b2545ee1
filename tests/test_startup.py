"""Zero-config start in front of the local Ollama, and the refusal to
listen on one of Aivonx's own nodes."""
from __future__ import annotations

import json
import socket
import sqlite3

import pytest
from tornado.httpclient import AsyncHTTPClient

from aivonx.startup import ollama_host, same_endpoint
from tests.helpers import free_port, run_to_end, start_aivonx


@pytest.mark.parametrize("value, url", [
    ("", "http://127.0.0.1:11434"),
    ("0.0.0.0", "http://127.0.0.1:11434"),
    ("0.0.0.0:11500", "http://127.0.0.1:11500"),
    (":11435", "http://127.0.0.1:11435"),
    ("[::]:11434", "http://127.0.0.1:11434"),
    ("gpu1", "http://gpu1:11434"),
    ("gpu1:1234", "http://gpu1:1234"),
    ("http://gpu1", "http://gpu1:80"),
    ("https://gpu1/ollama", "https://gpu1:443"),
    ("https://gpu1:8443", "https://gpu1:8443"),
    ("::1", "http://[::1]:11434"),
    ("[::1]:99", "http://[::1]:99"),
    (" '10.0.0.7:11434' ", "http://10.0.0.7:11434"),
    ("gpu1:99999", "http://gpu1:11434"),
])
def test_ollama_host_is_read_the_way_ollama_reads_it(value, url):
    assert ollama_host({"OLLAMA_HOST": value}) == url


def test_ollama_host_unset_is_the_local_default():
    assert ollama_host({}) == "http://127.0.0.1:11434"


@pytest.mark.parametrize("listen, node, loops", [
    (("127.0.0.1", 8000), ("localhost", 8000), True),
    (("127.0.0.1", 8000), ("127.0.0.1", 8001), False),
    (("0.0.0.0", 8000), ("127.0.0.1", 8000), True),
    (("0.0.0.0", 8000), (socket.gethostname(), 8000), True),
    (("10.0.0.5", 8000), ("10.0.0.5", 8000), True),
    (("10.0.0.5", 8000), ("127.0.0.1", 8000), False),
    (("127.0.0.1", 8000), ("https://[::1]", 8000), True),
    (("127.0.0.1", 0), ("127.0.0.1", 0), False),
])
def test_a_node_at_the_listening_address_is_a_loop(listen, node, loops):
    assert same_endpoint(*listen, *node) is loops


async def tag_names(url: str) -> list[str]:
    response = await AsyncHTTPClient().fetch(url + "/api/tags")
    return [m["model"] for m in json.loads(response.body)["models"]]


def stored_nodes(db: str) -> list[tuple[str, int]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("select address, port from node order by id").fetchall()


async def test_no_node_anywhere_serves_the_local_ollama(io_loop, make_node, tmp_path):
    local = await make_node(["llama3:latest"])
    other = await make_node(["mistral:latest"])
    db = str(tmp_path / "zero.db")
    env = {"OLLAMA_HOST": f"0.0.0.0:{local.port}", "AIVONX_NODES": ""}
    proc = await start_aivonx("--db", db, env=env)
    try:
        assert f"serving the local Ollama at http://127.0.0.1:{local.port}" in proc.output
        assert await tag_names(proc.url) == ["llama3:latest"]
    finally:
        assert await proc.stop() == 0
    assert stored_nodes(db) == [("127.0.0.1", local.port)]
    # An existing node list wins over OLLAMA_HOST.
    proc = await start_aivonx("--db", db, env={**env, "OLLAMA_HOST": other.url})
    try:
        assert "serving the local Ollama" not in proc.output
        assert await tag_names(proc.url) == ["llama3:latest"]
    finally:
        assert await proc.stop() == 0


async def test_an_explicit_node_wins_over_the_local_default(io_loop, make_node, tmp_path):
    given = await make_node(["mistral:latest"])
    db = str(tmp_path / "given.db")
    proc = await start_aivonx("--db", db, "--node", given.url,
                              env={"OLLAMA_HOST": f"127.0.0.1:{free_port()}"})
    try:
        assert "serving the local Ollama" not in proc.output
        assert await tag_names(proc.url) == ["mistral:latest"]
    finally:
        assert await proc.stop() == 0
    assert stored_nodes(db) == [("127.0.0.1", given.port)]


@pytest.mark.parametrize("host, node", [("127.0.0.1", "http://localhost:{port}"),
                                        ("0.0.0.0", "127.0.0.1:{port}")])
async def test_listening_on_a_nodes_address_is_refused(io_loop, tmp_path, host, node):
    port = free_port()
    code, out = await run_to_end("--host", host, "--port", str(port), "--db",
                                 str(tmp_path / "loop.db"), "--node", node.format(port=port))
    assert code == 1, out
    (line,) = out.strip().splitlines()[-1:]
    assert line.startswith(f"aivonx: refusing to listen on {host}:{port}") and "loop" in line
    assert "Traceback" not in out
