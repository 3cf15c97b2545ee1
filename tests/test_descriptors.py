"""Running out of file descriptors: slow clients must not spin the proxy,
flood its log, or get a healthy node blamed."""
from __future__ import annotations

import asyncio
import errno
import json
import os
import resource
import socket
import subprocess
import sys
import time

import pytest
from tornado.httpclient import AsyncHTTPClient

from aivonx.server import BoundedHTTPServer, connection_cap
from tests.helpers import ROOT, free_port

FD_LIMIT = 64


def limited() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


async def test_slow_clients_past_the_descriptor_limit(io_loop, node_process, tmp_path):
    node = node_process()
    port = free_port()
    proxy = subprocess.Popen(
        [sys.executable, "run.py", "--port", str(port), "--db", str(tmp_path / "a.db"),
         "--node", node.url, "--health-interval", "0.3", "--body-timeout", "3"],
        cwd=ROOT, stderr=subprocess.PIPE, text=True, preexec_fn=limited,
        env={**os.environ, "AIVONX_ROOT_PASSWORD": "test-root-password"})
    url = f"http://127.0.0.1:{port}"
    client = AsyncHTTPClient(force_instance=True)
    slow: list[socket.socket] = []
    try:
        for _ in range(100):
            try:
                if (await client.fetch(url + "/api/proxy/state", raise_error=False)).code == 200:
                    break
            except OSError:
                pass
            await asyncio.sleep(0.1)
        # Clients that send a head and then a body that never comes.
        for _ in range(FD_LIMIT + 40):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            slow.append(sock)
        await asyncio.sleep(2.0)  # probes keep running meanwhile
        for sock in slow:
            sock.close()
        slow.clear()
        # Served again, and the node was never blamed for the proxy's shortage.
        for _ in range(100):
            try:
                response = await client.fetch(url + "/api/generate", method="POST",
                                              body=json.dumps({"model": "llama3", "prompt": "x",
                                                               "stream": False}),
                                              raise_error=False, request_timeout=10)
                if response.code == 200:
                    break
            except OSError:
                pass
            await asyncio.sleep(0.1)
        assert response.code == 200
        state = json.loads((await client.fetch(url + "/api/proxy/state")).body)
        assert state["nodes"][0]["health"] == "healthy", state["nodes"][0]
    finally:
        for sock in slow:
            sock.close()
        client.close()
        proxy.terminate()
        _, err = proxy.communicate(timeout=30)
    assert "Too many open files" not in err
    assert "Traceback" not in err


def test_the_cap_leaves_room_for_a_node_connection_each() -> None:
    assert connection_cap(4096, 64) == 24
    assert connection_cap(4096, 1 << 20) == 4096
    assert connection_cap(10, 256) == 10


class _Exhausted(socket.socket):
    """A listening socket on which accept finds no descriptor."""

    def accept(self):  # type: ignore[override]
        raise OSError(errno.EMFILE, "Too many open files")


async def test_accept_without_descriptors_pauses_and_logs_once(io_loop, caplog) -> None:
    import tornado.web

    server = BoundedHTTPServer(tornado.web.Application())
    sock = _Exhausted(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.setblocking(False)
    server.add_sockets([sock])
    waiting = [socket.create_connection(sock.getsockname()) for _ in range(3)]
    try:
        started = time.monotonic()
        while time.monotonic() - started < 1.0:
            await asyncio.sleep(0.05)
        warnings = [r for r in caplog.records if "out of file descriptors" in r.getMessage()]
        assert len(warnings) == 1
        # Paused between tries: a handful in a second, not a busy loop.
        assert 1 <= server.accept_errors_total <= 10
    finally:
        for conn in waiting:
            conn.close()
        server.stop()


pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")
