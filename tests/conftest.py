"""Fixtures: test Ollama nodes and an Aivonx in front of them, all on
127.0.0.1 in the test's own IOLoop, driven over real HTTP."""
from __future__ import annotations

import os
import shutil
from typing import Any, Awaitable, Callable

import pytest
from tornado.httpserver import HTTPServer

from aivonx.app import Context, bound_port, make_server
from aivonx.relay.resolver import parse_networks
from aivonx.settings import Settings
from tests.fakes.fake_ollama import FakeOllama
from tests.helpers import ROOT_PASSWORD, NodeProcess
from tests.services import PostgresServer, RedisServer, missing, postgres_bin

LOOPBACK = parse_networks("127.0.0.0/8,::1/128")
# Aivonx processes the tests start inherit the same fence.
os.environ["AIVONX_NODE_NETWORKS"] = "127.0.0.0/8,::1/128"


class Proxy:
    """A running Aivonx: its URL and its shared objects."""

    def __init__(self, ctx: Context, server: HTTPServer) -> None:
        self.ctx = ctx
        self.server = server
        self.port = bound_port(server)
        self.url = f"http://127.0.0.1:{self.port}"

    @property
    def registry(self):
        return self.ctx.registry

    def node(self, fake: FakeOllama):
        """The registry's state for a fake node."""
        for state in self.ctx.registry.nodes.values():
            if state.port == fake.port:
                return state
        raise KeyError(fake.url)

    async def probe(self) -> None:
        await self.ctx.monitor.probe_all()

    async def stop(self) -> None:
        self.server.stop()
        await self.server.close_all_connections()
        self.ctx.close()
        await self.ctx.wait_closed()


@pytest.fixture
def make_node(io_loop) -> Callable[..., Awaitable[FakeOllama]]:
    nodes: list[FakeOllama] = []

    async def make(models=("llama3:latest",), **kwargs: Any) -> FakeOllama:
        node = FakeOllama(list(models), **kwargs)
        await node.start()
        nodes.append(node)
        return node

    yield make

    async def stop_all() -> None:
        for node in nodes:
            await node.stop()

    io_loop.run_sync(stop_all)


@pytest.fixture
def make_proxy(io_loop, tmp_path) -> Callable[..., Awaitable[Proxy]]:
    proxies: list[Proxy] = []

    async def make(nodes: list[FakeOllama] = (), db: str | None = None, start: bool = True,
                   **overrides: Any) -> Proxy:
        # Whatever node a test adds, the proxy never connects beyond loopback.
        options = {"health_interval": 0.5, "probe_timeout": 1.0,
                   "root_password": ROOT_PASSWORD, "node_networks": LOOPBACK, **overrides}
        settings = Settings(port=0, db=db or str(tmp_path / f"aivonx{len(proxies)}.db"),
                            nodes=[n.url for n in nodes], **options)
        ctx = Context(settings)
        ctx.open_store()
        if start:
            await ctx.start()
        server = make_server(ctx)
        server.listen(0, address="127.0.0.1")
        proxy = Proxy(ctx, server)
        proxies.append(proxy)
        return proxy

    yield make

    async def stop_all() -> None:
        for proxy in proxies:
            await proxy.stop()

    io_loop.run_sync(stop_all)


@pytest.fixture
def node_process() -> Callable[..., NodeProcess]:
    """Fake nodes in processes of their own (to stop them with a signal, or
    to keep their memory out of the test's)."""
    started: list[NodeProcess] = []

    def start(*args: str) -> NodeProcess:
        node = NodeProcess(*args)
        started.append(node)
        return node

    yield start
    for node in started:
        node.kill()


@pytest.fixture
def artifacts_dir() -> str:
    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "artifacts")
    os.makedirs(path, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def postgres_server():
    """One PostgreSQL for the session (a private data directory and port)."""
    bindir = postgres_bin()
    if bindir is None or not os.path.exists(os.path.join(bindir, "initdb")):
        missing("PostgreSQL (initdb, postgres)")
    server = PostgresServer(bindir)
    yield server
    server.remove()


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """A fresh database on the session's PostgreSQL, for this test alone."""
    if postgres_server.proc is None:  # a test stopped it
        postgres_server.start()
    return postgres_server.new_database()


@pytest.fixture(scope="session")
def redis_server():
    """One Redis for the session (no persistence, its own port)."""
    binary = shutil.which("redis-server")
    if binary is None:
        missing("redis-server")
    server = RedisServer(binary)
    yield server
    server.remove()


@pytest.fixture
def redis_url(redis_server) -> str:
    """The session's Redis, emptied for this test (started again if a test
    stopped it)."""
    if redis_server.proc is None:
        redis_server.start()
    redis_server.flush()
    yield redis_server.url
    if redis_server.proc is None:
        redis_server.start()
