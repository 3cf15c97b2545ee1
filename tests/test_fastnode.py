"""benchmarks/fastnode.py, the benchmark's node, speaks Ollama's wire format: the real
`ollama` client reads its answers, streams come one line per HTTP chunk, and pipelined,
chunked and closing requests are framed right. It runs as the benchmark runs it: its own
process on 127.0.0.1."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from typing import Iterator

import ollama
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASTNODE = os.path.join(REPO, "benchmarks", "fastnode.py")
MODELS = "llama3:latest,nomic-embed-text:latest"


def start(*args: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, FASTNODE, "--port", "0", "--models", MODELS,
                             *args], cwd=REPO, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("listening on http://127.0.0.1:"), line
    return proc, int(line.rsplit(":", 1)[1])


@pytest.fixture
def node() -> Iterator[int]:
    proc, port = start("--chunks", "4")
    yield port
    proc.terminate()
    proc.wait(10)


def exchange(port: int, raw: bytes, until: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes and read until `until` has arrived (or the node closed)."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(raw)
        while until not in received:
            data = sock.recv(65536)
            if not data:
                break
            received += data
    return received


def chunks_of(body: bytes) -> list[bytes]:
    """The chunks of a chunked body, checking its framing; the terminator must be there."""
    out = []
    while True:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            assert body == b"\r\n"
            return out
        out.append(body[:size])
        assert body[size:size + 2] == b"\r\n"
        body = body[size + 2:]


def test_the_ollama_client_reads_every_answer(node: int) -> None:
    client = ollama.Client(host=f"http://127.0.0.1:{node}")
    whole = client.generate(model="llama3", prompt="two words", stream=False)
    assert whole.model == "llama3" and whole.done and whole.response == "tok0 tok1 tok2 tok3 "
    assert whole.prompt_eval_count == 2 and whole.eval_count == 4 and whole.total_duration > 0
    parts = list(client.chat(model="llama3", messages=[{"role": "user", "content": "hi"}],
                             stream=True))
    assert [p.message.content for p in parts] == ["tok0 ", "tok1 ", "tok2 ", "tok3 ", ""]
    assert [p.done for p in parts] == [False] * 4 + [True]
    assert parts[-1].done_reason == "stop" and parts[-1].eval_count == 4
    assert parts[-1].prompt_eval_count == 1
    embedded = client.embed(model="nomic-embed-text", input=["a", "b"])
    assert len(embedded.embeddings) == 2 and embedded.embeddings[0] != embedded.embeddings[1]
    assert abs(sum(v * v for v in embedded.embeddings[0]) - 1) < 1e-9
    assert [m.model for m in client.list().models] == MODELS.split(",")
    assert {m.model for m in client.ps().models} == set(MODELS.split(","))
    with pytest.raises(ollama.ResponseError) as missing:
        client.generate(model="nope", prompt="x", stream=False)
    assert missing.value.status_code == 404 and missing.value.error == "model 'nope' not found"


def test_a_stream_sends_one_line_per_http_chunk_and_ends_with_the_done_line(node: int
                                                                            ) -> None:
    body = json.dumps({"model": "llama3", "prompt": "hi"}).encode()
    answer = exchange(node, b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: %d"
                      b"\r\n\r\n%s" % (len(body), body), b"\r\n0\r\n\r\n")
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Content-Type: application/x-ndjson" in head
    assert b"Transfer-Encoding: chunked" in head and b"Content-Length" not in head
    lines = chunks_of(rest)
    assert all(line.endswith(b"\n") and line.count(b"\n") == 1 for line in lines)
    parsed = [json.loads(line) for line in lines]
    assert [p["response"] for p in parsed] == ["tok0 ", "tok1 ", "tok2 ", "tok3 ", ""]
    final = parsed[-1]
    assert final["done"] and final["done_reason"] == "stop" and final["context"]
    for field in ("total_duration", "load_duration", "prompt_eval_count",
                  "prompt_eval_duration", "eval_count", "eval_duration"):
        assert isinstance(final[field], int), field


def test_pipelined_requests_are_answered_in_order_with_chunked_bodies(node: int) -> None:
    generate = json.dumps({"model": "llama3", "prompt": "p", "stream": False}).encode()
    half = len(generate) // 2
    raw = (b"POST /api/generate HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"%x\r\n%s\r\n%x;ext=1\r\n%s\r\n0\r\nX-Trailer: t\r\n\r\n"
           % (half, generate[:half], len(generate) - half, generate[half:])
           + b"GET /api/version HTTP/1.1\r\n\r\n"
           + b"POST /api/chat HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s"
           % (len(b'{"model":"llama3","messages":[{"content":"x"}]}'),
              b'{"model":"llama3","messages":[{"content":"x"}]}')
           + b"GET /nothing HTTP/1.1\r\n\r\n"
           + b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
    answer = exchange(node, raw, b"never")  # read until the node closes
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)
    assert statuses == [b"200", b"200", b"200", b"404", b"200"]
    order = [answer.find(marker) for marker in (b'"response":"tok0 tok1 tok2 tok3 "',
                                                b'{"version":"0.12.3"}', b'"content":"tok3 "',
                                                b'{"error":"404 page not found"}',
                                                b"Ollama is running")]
    assert -1 not in order and order == sorted(order)
    assert answer.endswith(b"Ollama is running")  # then closed, as the last one asked


def test_head_answers_headers_only_and_bad_bodies_get_ollamas_errors(node: int) -> None:
    head = exchange(node, b"HEAD /api/tags HTTP/1.1\r\nConnection: close\r\n\r\n", b"never")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n")
    empty = exchange(node, b"POST /api/embed HTTP/1.1\r\nConnection: close\r\n\r\n", b"never")
    assert empty.startswith(b"HTTP/1.1 400 ")
    assert empty.endswith(b'{"error":"missing request body"}')
    wrong = exchange(node, b"GET /api/generate HTTP/1.1\r\nConnection: close\r\n\r\n",
                     b"never")
    assert wrong.startswith(b"HTTP/1.1 405 ")


def test_a_held_stream_sends_its_first_line_then_waits_and_records_the_client_leaving(
        ) -> None:
    proc, port = start("--chunks", "3", "--chunk-delay", "30", "--records", "5")
    try:
        body = json.dumps({"model": "llama3", "prompt": "marker"}).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"POST /api/generate HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body))
            received = b""
            while b'"response":"tok0 "' not in received:
                received += sock.recv(65536)
            sock.settimeout(0.3)
            with pytest.raises(socket.timeout):  # the next line is 30 s away
                sock.recv(65536)
            left_at = time.time()
        for _ in range(100):
            records = json.loads(exchange(port, b"GET /_fake/requests HTTP/1.1\r\n"
                                          b"Connection: close\r\n\r\n",
                                          b"never").partition(b"\r\n\r\n")[2])
            mine = [r for r in records if (r["json"] or {}).get("prompt") == "marker"]
            if mine and mine[0]["client_closed_at"]:
                break
            time.sleep(0.05)
        assert mine and mine[0]["client_closed_at"] >= left_at - 0.01
        assert mine[0]["finished_at"] is None and mine[0]["chunks_sent"] == 1
    finally:
        proc.terminate()
        proc.wait(10)
