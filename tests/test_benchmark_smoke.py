"""benchmarks/bench.py and benchmarks/soak.py still run end to end, and the fake node's
request log that the benchmark relies on works from another process. No speed is asserted:
it depends on the machine."""
from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADINGS = ("a. Small requests: /api/generate", "a. Small requests: /api/embed",
            "b. Paced streams", "c. Fast streams", "d. Held streams", "e. Client disconnect")


def finish(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """The process's output; on timeout SIGTERM (the script stops its own children on the
    way out), then SIGKILL, and fail."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        raise AssertionError(f"timed out after {timeout} s:\n{out}\n{err[-3000:]}")


def test_quick_benchmark_prints_every_table_without_errors() -> None:
    proc = subprocess.Popen([sys.executable, "benchmarks/bench.py", "--quick", "--targets",
                             "direct,aivonx"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    out, err = finish(proc, 120)
    assert proc.returncode == 0, err[-3000:]
    for heading in HEADINGS:
        assert heading in out
    assert re.search(r"^\| metric \| direct \| aivonx \| aivonx ÷ nginx \|", out, re.M)
    assert re.search(r"^errors: direct=0 aivonx=0$", out, re.M), out
    assert "Note: nodes: benchmarks/fastnode.py" in out  # the nodes the figures come from


def test_quick_soak_loses_nothing_and_prints_its_summary() -> None:
    """18 s of mixed traffic while nodes are killed, hung, slowed and flapped, next to
    slow-body clients, a login burst and a 48 MB body."""
    proc = subprocess.Popen([sys.executable, "benchmarks/soak.py", "--minutes", "0.3"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    out, err = finish(proc, 90)
    assert proc.returncode == 0, out + err[-3000:]
    for heading in ("## Soak:", "### Requests", "### Faults", "### Aivonx memory (VmRSS)",
                    "### Hostile clients", "### After the traffic stopped", "**PASS**"):
        assert heading in out, out
    assert re.search(r"^Lost: \*\*0\*\*\.", out, re.M), out
    faults = re.search(r"^\| \*\*total faults\*\* \| \*\*(\d+)\*\* \|$", out, re.M)
    assert faults and int(faults.group(1)) >= 2, out
    assert re.search(r"^- in flight: 0, queue depth: 0 ", out, re.M), out
    closed = re.findall(r"^\| slow body, [^|]+ \| closed by the proxy after --body-timeout "
                        r"\| (\d+) \|", out, re.M)
    assert len(closed) == 3 and all(int(n) >= 1 for n in closed), out
    assert re.search(r"^\| login burst, 30 at once \| 401 \(wrong password\) \| [1-5] \|",
                     out, re.M), out
    assert re.search(r"^\| login burst, 30 at once \| 429 with Retry-After \| 2[5-9] \|",
                     out, re.M), out
    assert re.search(r"^\| login burst, 30 at once \| root logged in \(200\) \| 1 \|",
                     out, re.M), out
    assert re.search(r"^\| 48 MB /api/embed input \| completed \| 1 \|", out, re.M), out
    assert "#### 48 MB bodies: Aivonx memory (VmRSS) around each" in out, out


def test_fake_node_tells_another_process_when_its_client_left() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "tests.fakes.fake_ollama", "--port", "0",
                             "--records", "3", "--chunks", "3", "--chunk-delay", "30"],
                            cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline().rsplit(":", 1)[1])
        body = json.dumps({"model": "llama3", "prompt": "marker"}).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
                         b"\r\n%s" % (len(body), body))
            received = b""
            while b'"response":"tok0 "' not in received:  # the first chunk, then 30 s of quiet
                received += sock.recv(65536)
            closed_at = time.time()
        record = wait_for_close(port, "marker")
        assert closed_at - 0.01 <= record["client_closed_at"] <= closed_at + 2
        assert record["finished_at"] is None and record["chunks_sent"] == 1
        for _ in range(4):
            get_json(port, "/api/version")
        assert len(get_json(port, "/_fake/requests")) == 3  # only the last --records kept
    finally:
        proc.terminate()
        proc.wait(10)


def get_json(port: int, path: str) -> object:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def wait_for_close(port: int, prompt: str) -> dict:
    """The record of the request with `prompt`, once the node saw its client leave."""
    for _ in range(100):
        for record in get_json(port, "/_fake/requests"):
            if (record["json"] or {}).get("prompt") == prompt and record["client_closed_at"]:
                return record
        time.sleep(0.05)
    raise AssertionError("the node never saw its client leave")
