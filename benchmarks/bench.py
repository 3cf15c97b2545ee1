#!/usr/bin/env python3
"""Aivonx side by side with direct access and with nginx, in front of the same fake nodes.

    python benchmarks/bench.py                              # full run, several minutes
    python benchmarks/bench.py --quick --targets direct,aivonx   # smoke run, under a minute

Every server is a separate process on 127.0.0.1: two fake Ollama nodes
(benchmarks/fastnode.py, fast enough not to cap the direct figure; --fake-nodes: the
tests' tests/fakes/fake_ollama.py), Aivonx (run.py) and nginx in front of both nodes.
This process is the load generator: a lean asyncio HTTP/1.1 client that parses
responses itself, so it can time every socket read and count the NDJSON lines
in it (an HTTP library would merge reads and cost more than the proxy under test).

The scenarios run in phases; each phase starts nodes configured for it (chunk
count and pace are command-line knobs of the fake), a fresh Aivonx and nginx,
and measures every target in turn, repetition after repetition, so that drift
on the machine hits all targets alike. The Markdown report goes to stdout,
progress to stderr. See benchmarks/README.md for what each scenario means.
"""
from __future__ import annotations

import argparse
import asyncio
import ctypes
import functools
import http.client
import importlib.metadata
import json
import math
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import socket
import statistics
import string
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
HOST = "127.0.0.1"
TARGETS = ("direct", "aivonx", "base", "nginx")  # base: --base-commit
MODELS = "llama3:latest,nomic-embed-text:latest"
STREAM_CHUNKS = 20
LINES_PER_STREAM = STREAM_CHUNKS + 1  # the token lines, then the final `done` line
SLOW_CHUNK_DELAY = 300.0  # held streams: the first chunk at once, then silence
SMALL_CONNECTIONS = 32
PACED_STREAMS = 64
FAST_STREAMS = 32
HELD_OPENING = 64  # streams being opened at once (a burst of thousands overflows backlogs)
AFTER_HELD_WAIT = 6  # settle periods after the held streams closed before RSS is read again
HELD_WARMUP = 16  # streams a fresh proxy serves before its idle memory is read
REQUEST_TIMEOUT = 30.0  # any single exchange; far above anything a healthy run sees
MAX_REQUESTS_PER_WORKER = 1_000_000  # a count bound on top of each loop's time bound
CLOSE_WAIT = 3.0  # how long a node may take to see a departed client before we give up
START_TIMEOUT = 30.0
# Aivonx queues what exceeds a node's slots (4 by default, Ollama's parallelism). The fake
# nodes, like nginx, take any number at once, so the benchmark lifts the slots to measure
# the relay rather than the queue.
NODE_SLOTS = 1024  # the most the nodes API takes: 2 nodes hold the 2,000 held streams
# Aivonx's flags besides its address, database and nodes: warnings only (nginx logs no
# access lines either).
AIVONX_ARGS = ("--health-interval", "10", "--log-level", "warning")
PR_SET_PDEATHSIG = 1

GENERATE_SMALL = {"model": "llama3", "prompt": "hi", "stream": False}
EMBED_SMALL = {"model": "nomic-embed-text", "input": "hello world"}
GENERATE_STREAM = {"model": "llama3", "prompt": "hi"}

_LIBC = ctypes.CDLL(None, use_errno=True)


def log(message: str) -> None:
    """Progress goes to stderr, so stdout holds only the report."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- processes


def raise_nofile_limit() -> None:
    """Thousands of held streams need as many descriptors; the default soft limit is 1024."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _child_setup() -> None:
    """Runs in each child before exec: room for the sockets, and death with the benchmark
    even when it is killed outright and its own cleanup cannot run."""
    raise_nofile_limit()
    _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """A plain GET for setup and polling, never for measuring."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


class Children:
    """Every process the benchmark started, each in its own process group, so that
    stopping one also stops what it spawned (nginx's worker)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, argv: list[str], workdir: Path, cwd: Path = ROOT
              ) -> tuple[subprocess.Popen, Path]:
        """Start a child whose output goes to a log file in `workdir` (a pipe nobody reads
        could fill up and stall it)."""
        log_path = workdir / f"{name}.log"
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, cwd=cwd,
                                    start_new_session=True, preexec_fn=_child_setup)
        self.procs.append(proc)
        return proc, log_path

    def stop(self, procs: list[subprocess.Popen], grace: float = 5.0) -> None:
        """SIGTERM each group, then SIGKILL whatever is still alive after `grace`."""
        for proc in procs:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
            self.procs.remove(proc)

    def stop_all(self) -> None:
        self.stop(list(reversed(self.procs)))


def _signal_group(proc: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(proc.pid, signum)
    except ProcessLookupError:
        pass


def _wait_until(proc: subprocess.Popen, log_path: Path, what: str,
                ready: Callable[[], bool]) -> None:
    """Poll `ready` until it holds; fail with the child's log if it dies or takes too long."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if ready():
            return
        time.sleep(0.05)
    tail = log_path.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"{what} did not start (exit code {proc.poll()}):\n{tail}")


def _answers(port: int, path: str) -> bool:
    try:
        return http_get(port, path)[0] == 200
    except OSError:
        return False


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its descendants (nginx's master and worker)."""
    total_kb = 0
    for member in [pid, *_descendants(pid)]:
        try:
            status = Path(f"/proc/{member}/status").read_text()
        except OSError:
            continue
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        total_kb += int(match.group(1)) if match else 0
    return total_kb / 1024


def _descendants(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


# ---------------------------------------------------------------- the cluster of one phase


Launcher = Callable[[], subprocess.Popen]


@dataclass
class Cluster:
    """What one phase runs: the fake nodes and the proxies in front of them."""

    children: Children
    node_ports: list[int]
    node_procs: list[subprocess.Popen]
    proxy_ports: dict[str, int] = field(default_factory=dict)
    proxies: dict[str, subprocess.Popen] = field(default_factory=dict)
    launchers: dict[str, Launcher] = field(default_factory=dict)

    @property
    def targets(self) -> list[str]:
        return ["direct", *self.proxy_ports]

    @property
    def procs(self) -> list[subprocess.Popen]:
        return [*self.proxies.values(), *self.node_procs]

    def ports(self, target: str) -> list[int]:
        """Where a target's requests go: direct access spreads them over the nodes itself."""
        return self.node_ports if target == "direct" else [self.proxy_ports[target]]

    def add(self, target: str, port: int, launch: Launcher) -> None:
        self.proxy_ports[target], self.launchers[target] = port, launch
        self.proxies[target] = launch()

    def restart(self, target: str) -> None:
        """A fresh process for a proxy, on the same port. Blocks: call it while no load runs."""
        self.children.stop([self.proxies[target]])
        self.proxies[target] = self.launchers[target]()


def node_command(port: int, node_args: list[str], fast: bool = False) -> list[str]:
    """The command line of a fake node (port 0: any free port): benchmarks/fastnode.py
    when `fast`, else the tests' Tornado fake (all of Ollama's API and its faults, but a
    few thousand requests/s at most)."""
    program = [str(HERE / "fastnode.py")] if fast else ["-m", "tests.fakes.fake_ollama"]
    return [sys.executable, *program, "--port", str(port), "--models", MODELS, *node_args]


def listening_port(log_path: Path) -> int | None:
    """The port a fake node says it listens on, once it has said so."""
    match = re.search(rb"listening on http://127\.0\.0\.1:(\d+)", log_path.read_bytes())
    return int(match.group(1)) if match else None


def start_nodes(children: Children, workdir: Path, node_args: list[str], count: int = 2,
                fast: bool = False) -> tuple[list[int], list[subprocess.Popen]]:
    started = [children.start(f"node{i}", node_command(0, node_args, fast), workdir)
               for i in range(count)]
    ports = []
    for proc, log_path in started:
        _wait_until(proc, log_path, "fake node", lambda p=log_path: bool(listening_port(p)))
        ports.append(listening_port(log_path))
    return ports, [proc for proc, _ in started]


def admin_call(port: int, method: str, path: str, body: dict | None = None,
               token: str | None = None, name: str = "aivonx") -> dict:
    """One management API call, answered 200 with JSON, or RuntimeError."""
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    headers = {"Content-Type": "application/json",
               **({"Authorization": f"Bearer {token}"} if token else {})}
    try:
        conn.request(method, path, None if body is None else json.dumps(body), headers)
        response = conn.getresponse()
        answer = response.read()
    finally:
        conn.close()
    if response.status != 200:
        raise RuntimeError(f"{name} answered {method} {path} with {response.status}: "
                           f"{answer[:500]!r}")
    return json.loads(answer)


def prepare_aivonx(children: Children, workdir: Path, node_ports: list[int],
                   slots: int = NODE_SLOTS, args: tuple[str, ...] = AIVONX_ARGS,
                   root: Path = ROOT, name: str = "aivonx", extra: tuple[str, ...] = ()
                   ) -> tuple[int, Launcher]:
    """Aivonx from the checkout `root` with its own database and `slots` slots a node. Its
    first start creates the database and its nodes, and sets the slots through the nodes
    API as an admin would (user root, with the password this process puts in
    AIVONX_ROOT_PASSWORD for its children); later starts on the same database serve them.
    `extra` flags go only to a checkout whose run.py knows them (an older commit may not)."""
    port = free_port()
    db = workdir / f"{name}.db"
    nodes = [arg for p in node_ports for arg in ("--node", f"http://{HOST}:{p}")]
    password = os.environ.setdefault("AIVONX_ROOT_PASSWORD", secrets.token_urlsafe(18))
    args = (*args, *supported_flags(root, extra))

    def call(method: str, path: str, body: dict | None, token: str | None = None) -> dict:
        return admin_call(port, method, path, body, token, name)

    configured = False

    def launch() -> subprocess.Popen:
        nonlocal configured
        if configured:
            return _launch_aivonx(children, workdir, port, db, list(args), root, name)
        proc = _launch_aivonx(children, workdir, port, db, [*nodes, *args], root, name)
        token = call("POST", "/api/account/login",
                     {"username": "root", "password": password})["access"]
        listed = call("GET", f"/api/proxy/nodes?limit={len(node_ports) + 1}", None, token)
        if listed["count"] != len(node_ports):
            raise RuntimeError(f"{name} holds {listed['count']} nodes, not {len(node_ports)}")
        for node in listed["results"]:
            call("PATCH", f"/api/proxy/nodes/{node['id']}", {"slots": slots}, token)
        if "--workers" in args:
            time.sleep(3)  # the other workers read the change from the store every 2 s
        configured = True
        return proc

    return port, launch


def supported_flags(root: Path, flags: tuple[str, ...]) -> list[str]:
    """`flags` (pairs of flag and value) that the run.py of `root` lists in its --help."""
    if not flags:
        return []
    helptext = subprocess.run([sys.executable, str(root / "run.py"), "--help"], cwd=root,
                              capture_output=True, text=True, timeout=60).stdout
    kept = []
    for flag, value in zip(flags[::2], flags[1::2]):
        if re.search(rf"(^|\s){re.escape(flag)}\b", helptext):
            kept += [flag, value]
        else:
            log(f"{root} does not know {flag}: not passed")
    return kept


def _launch_aivonx(children: Children, workdir: Path, port: int, db: Path,
                   args: list[str], root: Path = ROOT, name: str = "aivonx"
                   ) -> subprocess.Popen:
    proc, log_path = children.start(name, [
        sys.executable, str(root / "run.py"), "--host", HOST, "--port", str(port),
        "--db", str(db), *args], workdir, cwd=root)
    _wait_until(proc, log_path, name, lambda: _answers(port, "/api/health"))
    return proc


def export_commit(commit: str, workdir: Path) -> Path:
    """The tree of `commit` of this repository, unpacked into `workdir` (git archive: no
    worktree to clean up, nothing in the repository changes)."""
    dest = workdir / f"base-{commit}"
    dest.mkdir()
    archive = subprocess.run(["git", "archive", "--format=tar", commit], cwd=ROOT,
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def prepare_nginx(children: Children, binary: str, workdir: Path, node_ports: list[int]
                  ) -> tuple[int, Launcher]:
    """nginx from benchmarks/nginx.conf.template, rendered into its own directory."""
    prefix = workdir / "nginx"
    prefix.mkdir()
    prefix.chmod(0o755)  # the worker runs as an unprivileged user when we are root
    port = free_port()
    servers = "\n".join(f"        server {HOST}:{p};" for p in node_ports)
    config = string.Template((HERE / "nginx.conf.template").read_text()).substitute(
        prefix=prefix, port=port, servers=servers,
        nofile=resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    (prefix / "nginx.conf").write_text(config)
    argv = [binary, "-c", str(prefix / "nginx.conf"), "-p", str(prefix), "-g", "daemon off;"]

    def launch() -> subprocess.Popen:
        proc, log_path = children.start("nginx", argv, workdir)
        _wait_until(proc, log_path, "nginx", lambda: _answers(port, "/"))
        return proc

    return port, launch


@dataclass
class Setup:
    """What the proxies of every phase are made of."""

    nginx: str | None = None        # the nginx binary
    base_root: Path | None = None   # the checkout of the `base` target
    workers: int = 1                # --workers of the `aivonx` target (and `base` if it has it)
    wrk: str | None = None          # the wrk binary for the small requests
    fast_nodes: bool = True         # benchmarks/fastnode.py, not tests/fakes/fake_ollama.py


def start_cluster(children: Children, workdir: Path, node_args: list[str],
                  targets: list[str], setup: Setup) -> Cluster:
    node_ports, node_procs = start_nodes(children, workdir, node_args, fast=setup.fast_nodes)
    cluster = Cluster(children, node_ports, node_procs)
    extra = ("--workers", str(setup.workers)) if setup.workers != 1 else ()
    preparers = {
        "aivonx": lambda: prepare_aivonx(children, workdir, node_ports, extra=extra),
        "base": lambda: prepare_aivonx(children, workdir, node_ports, extra=extra,
                                       root=setup.base_root or ROOT, name="base"),
        "nginx": lambda: prepare_nginx(children, setup.nginx or "", workdir, node_ports)}
    try:
        for target in targets:
            if target in preparers:
                cluster.add(target, *preparers[target]())
    except BaseException:
        children.stop(cluster.procs)
        raise
    return cluster


# ---------------------------------------------------------------- the HTTP/1.1 client


def build_request(port: int, path: str, body: dict | None = None) -> bytes:
    """The raw bytes of one request (a POST with a JSON body, or a GET)."""
    if body is None:
        return f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode()
    payload = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
            ).encode() + payload


class Reply:
    """One response as the client saw it: every NDJSON line with the time of the socket
    read that completed it, and how many lines each read carried."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sent_at: float) -> None:
        self.sent_at = sent_at
        self.done_at = math.nan
        self.status = 0
        self.headers: dict[str, str] = {}  # names and values lower-cased
        self.error: str | None = None
        self.body = bytearray()
        self.line_times: list[float] = []
        self.body_reads = 0  # socket reads that carried body bytes
        self.odd_reads = 0  # of those, the ones that did not complete exactly one line
        self.http_chunks = 0  # chunks of a chunked body, as the last hop framed them
        self.odd_chunks = 0  # of those, the ones not holding exactly one line
        self.keep_alive = True
        self.done: asyncio.Future[Reply] = loop.create_future()
        self.first_line: asyncio.Future[Reply] = loop.create_future()  # or failure

    @property
    def ok(self) -> bool:
        return self.error is None and self.status == 200

    def settle(self, error: str | None = None, at: float | None = None) -> None:
        """End the exchange; the futures carry the reply, never an exception, so that
        nobody has to retrieve one."""
        if self.error is None:
            self.error = error
        self.done_at = time.perf_counter() if at is None else at
        for future in (self.first_line, self.done):
            if not future.done():
                future.set_result(self)


class Connection(asyncio.Protocol):
    """A keep-alive HTTP/1.1 connection that parses responses itself, so that each socket
    read (one data_received call) is timed and its lines counted. One request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._buffer = bytearray()
        self._reply: Reply | None = None
        self._state = self._idle
        self._remaining = 0
        self._read_at = 0.0
        self._read_has_body = False
        self._read_lines = 0
        self._chunk_lines = 0

    @classmethod
    async def open(cls, port: int) -> Connection:
        _, conn = await asyncio.get_running_loop().create_connection(cls, HOST, port)
        return conn

    def close(self) -> None:
        """Close now; the connection counts as closed at once, not when asyncio says so."""
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def send(self, raw: bytes) -> Reply:
        """Start an exchange; await its `done` (or `first_line`) future."""
        assert self._reply is None and self.transport is not None
        reply = Reply(asyncio.get_running_loop(), time.perf_counter())
        if self.closed:
            reply.settle("connection closed")
            return reply
        self._reply, self._state = reply, self._head
        self.transport.write(raw)
        return reply

    async def fetch(self, raw: bytes, timeout: float = REQUEST_TIMEOUT) -> Reply:
        reply = self.send(raw)
        try:
            await asyncio.wait_for(asyncio.shield(reply.done), timeout)
        except asyncio.TimeoutError:
            reply.settle("timeout")
            self.close()
        return reply

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._reply is not None:
            if self._state == self._until_close:
                self._finish()
            else:
                self._reply.settle(f"connection lost: {exc or 'closed by peer'}")
                self._reply = None

    def data_received(self, data: bytes) -> None:
        self._read_at, self._read_has_body, self._read_lines = time.perf_counter(), False, 0
        reply = self._reply
        if reply is None:
            self.close()  # bytes nobody asked for: the framing is lost
            return
        self._buffer += data
        try:
            while self._state():
                pass
        except ValueError as exc:
            reply.settle(f"bad response: {exc}")
            self._reply = None
            self.close()
        if self._read_has_body:
            reply.body_reads += 1
            reply.odd_reads += self._read_lines != 1

    # parser states: each consumes what it can and says whether to go on

    def _idle(self) -> bool:
        return False

    def _head(self) -> bool:
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            return False
        lines = bytes(self._buffer[:end]).decode("latin-1").split("\r\n")
        del self._buffer[:end + 4]
        version, status = lines[0].split(" ", 2)[:2]
        headers = dict(line.split(":", 1) for line in lines[1:])
        headers = {k.strip().lower(): v.strip().lower() for k, v in headers.items()}
        reply = self._reply
        assert reply is not None
        reply.status = int(status)
        reply.headers = headers
        reply.keep_alive = version == "HTTP/1.1" and headers.get("connection") != "close"
        if headers.get("transfer-encoding") == "chunked":
            self._state = self._chunk_size
        elif "content-length" in headers:
            self._remaining = int(headers["content-length"])
            self._state = self._sized_body
        else:
            reply.keep_alive = False
            self._state = self._until_close
        return True

    def _sized_body(self) -> bool:
        if self._remaining and not self._take():
            return False
        if self._remaining == 0:
            self._finish()
        return False

    def _until_close(self) -> bool:
        self._remaining = len(self._buffer)
        self._take()
        return False

    def _chunk_size(self) -> bool:
        end = self._buffer.find(b"\r\n")
        if end < 0:
            return False
        size = int(bytes(self._buffer[:end]).split(b";")[0], 16)
        del self._buffer[:end + 2]
        self._remaining, self._chunk_lines = size, 0
        self._state = self._chunk_data if size else self._trailer
        return True

    def _chunk_data(self) -> bool:
        self._take()
        if self._remaining:
            return False
        self._state = self._chunk_end
        return True

    def _chunk_end(self) -> bool:
        if len(self._buffer) < 2:
            return False
        if self._buffer[:2] != b"\r\n":
            raise ValueError("chunk not followed by CRLF")
        del self._buffer[:2]
        reply = self._reply
        assert reply is not None
        reply.http_chunks += 1
        reply.odd_chunks += self._chunk_lines != 1
        self._state = self._chunk_size
        return True

    def _trailer(self) -> bool:
        """After the last chunk: optional trailer fields, then an empty line."""
        if self._buffer[:2] == b"\r\n":
            end = 2
        else:
            found = self._buffer.find(b"\r\n\r\n")
            if found < 0:
                return False
            end = found + 4
        del self._buffer[:end]
        self._finish()
        return False

    def _take(self) -> int:
        """Move up to `_remaining` body bytes into the reply; note the lines they complete."""
        reply = self._reply
        assert reply is not None
        data = self._buffer[:self._remaining]
        if not data:
            return 0
        del self._buffer[:len(data)]
        self._remaining -= len(data)
        reply.body += data
        self._read_has_body = True
        lines = data.count(b"\n")
        if lines:
            self._read_lines += lines
            self._chunk_lines += lines
            reply.line_times.extend([self._read_at] * lines)
            if not reply.first_line.done():
                reply.first_line.set_result(reply)
        return len(data)

    def _finish(self) -> None:
        reply = self._reply
        assert reply is not None
        self._reply, self._state = None, self._idle
        if not reply.keep_alive:
            self.close()
        reply.settle(at=self._read_at)


# ---------------------------------------------------------------- load loops


def percentile(values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile; None when there is nothing to rank."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(1, math.ceil(pct / 100 * len(ordered))) - 1]


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


@dataclass
class Tally:
    """What one closed-loop run observed, over all its connections."""

    completed: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    ttfc: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    lines: int = 0
    lines_lost: int = 0
    invalid_lines: int = 0
    body_reads: int = 0
    odd_reads: int = 0
    http_chunks: int = 0
    odd_chunks: int = 0
    elapsed: float = 0.0


def count_plain(reply: Reply, tally: Tally) -> None:
    """A one-body answer: it counts when it is a 200."""
    if not reply.ok:
        tally.errors += 1
        return
    tally.completed += 1
    tally.latencies.append(reply.done_at - reply.sent_at)


def count_stream(reply: Reply, tally: Tally, validate: bool) -> None:
    """A stream: every line there (and, with `validate`, valid JSON), timed per read."""
    lines = reply.body.split(b"\n")[:-1]
    invalid = sum(not _is_json(line) for line in lines) if validate else 0
    lost = max(0, LINES_PER_STREAM - len(lines))
    tally.lines += len(lines)
    tally.lines_lost += lost
    tally.invalid_lines += invalid
    tally.body_reads += reply.body_reads
    tally.odd_reads += reply.odd_reads
    tally.http_chunks += reply.http_chunks
    tally.odd_chunks += reply.odd_chunks
    finished = bool(lines) and b'"done":true' in lines[-1]  # not an in-band error line
    if not reply.ok or lost or invalid or len(lines) != LINES_PER_STREAM or not finished:
        tally.errors += 1
        return
    tally.completed += 1
    tally.ttfc.append(reply.line_times[0] - reply.sent_at)
    tally.gaps += [b - a for a, b in zip(reply.line_times, reply.line_times[1:])]


def _is_json(line: bytes) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


async def closed_loop(ports: list[int], connections: int, duration: float, path: str,
                      body: dict, count: Callable[[Reply, Tally], None]) -> Tally:
    """`connections` clients, each sending its next request when the last one ended,
    for `duration` seconds (and at most MAX_REQUESTS_PER_WORKER each). Connection i goes to
    ports[i % len(ports)]; connections open before the clock starts."""
    tally = Tally()
    requests = {port: build_request(port, path, body) for port in ports}
    conns = [await Connection.open(ports[i % len(ports)]) for i in range(connections)]
    start = time.perf_counter()
    deadline = start + duration

    async def worker(conn: Connection, port: int) -> None:
        for _ in range(MAX_REQUESTS_PER_WORKER):
            if time.perf_counter() >= deadline:
                break
            if conn.closed:
                try:
                    conn = await Connection.open(port)
                except OSError:
                    tally.errors += 1
                    await asyncio.sleep(0.05)
                    continue
            count(await conn.fetch(requests[port]), tally)
        conn.close()

    await asyncio.gather(*(worker(c, ports[i % len(ports)]) for i, c in enumerate(conns)))
    tally.elapsed = time.perf_counter() - start
    return tally


# ---------------------------------------------------------------- scenarios


@dataclass
class Options:
    reps: int
    duration: float
    held: list[int]
    trials: int
    settle: float
    wrk: str | None = None  # the small requests go through wrk when it is installed


LOAD_SAMPLES: list[float] = []  # the 1-minute load average after every measurement
CEILINGS: list[float] = []  # requests/s wrk drove against nginx answering by itself


Metrics = dict[str, "float | int | None"]
Measure = Callable[[Cluster, str, Options], Awaitable[Metrics]]


async def measure_small(cluster: Cluster, target: str, opts: Options, path: str,
                        body: dict) -> Metrics:
    if opts.wrk:
        return await wrk_small(opts.wrk, cluster.ports(target), opts.duration, path, body)
    tally = await closed_loop(cluster.ports(target), SMALL_CONNECTIONS, opts.duration, path,
                              body, count_plain)
    return {"rps": tally.completed / tally.elapsed,
            "p50_ms": ms(percentile(tally.latencies, 50)),
            "p99_ms": ms(percentile(tally.latencies, 99)), "errors": tally.errors}


# wrk's Lua side: each thread connects to one of the ports in turn (direct access spreads
# its connections over the nodes), every request is the same POST, and the summary comes
# back as one JSON line.
WRK_SCRIPT = """
local ports = {%(ports)s}
local next_port = 0
function setup(thread)
  thread.addr = wrk.lookup("%(host)s", tostring(ports[next_port %% #ports + 1]))[1]
  next_port = next_port + 1
end
wrk.method = "POST"
wrk.body = %(body)s
wrk.headers["Content-Type"] = "application/json"
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRKJSON {"requests": %%d, "duration_us": %%d, "connect": %%d, ' ..
    '"read": %%d, "write": %%d, "status": %%d, "timeout": %%d, "p50_us": %%d, ' ..
    '"p99_us": %%d}\\n', summary.requests, summary.duration, e.connect, e.read,
    e.write, e.status, e.timeout, latency:percentile(50), latency:percentile(99)))
end
"""
WRK_THREADS = 2  # one per core of the box this was tuned on; direct: one thread a node


async def wrk_small(binary: str, ports: list[int], duration: float, path: str,
                    body: dict, connections: int = SMALL_CONNECTIONS) -> Metrics:
    """`connections` keep-alive connections sending the same POST for `duration`
    seconds, driven by wrk (C, an event loop per thread): it reaches far more requests/s
    than any Python client, so what the targets can take is what is measured."""
    threads = max(WRK_THREADS, len(ports))
    script = WRK_SCRIPT % {"ports": ", ".join(map(str, ports)), "host": HOST,
                           "body": json.dumps(json.dumps(body))}
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as out:
        out.write(script)
    try:
        proc = await asyncio.create_subprocess_exec(
            binary, "-t", str(threads), "-c", str(connections),
            "-d", f"{max(1, round(duration))}s", "--timeout", f"{REQUEST_TIMEOUT:g}s",
            "-s", out.name, f"http://{HOST}:{ports[0]}{path}",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        stdout, stderr = await proc.communicate()
    finally:
        os.unlink(out.name)
    match = re.search(rb"^WRKJSON (.+)$", stdout, re.M)
    if proc.returncode != 0 or match is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {stdout[-1000:]!r} "
                           f"{stderr[-1000:]!r}")
    found = json.loads(match.group(1))
    errors = sum(found[k] for k in ("connect", "read", "write", "status", "timeout"))
    return {"rps": (found["requests"] - found["status"]) / (found["duration_us"] / 1e6),
            "p50_ms": found["p50_us"] / 1000, "p99_ms": found["p99_us"] / 1000,
            "errors": errors}


async def measure_paced(cluster: Cluster, target: str, opts: Options) -> Metrics:
    tally = await closed_loop(cluster.ports(target), PACED_STREAMS, opts.duration,
                              "/api/generate", GENERATE_STREAM,
                              functools.partial(count_stream, validate=True))
    return {"ttfc_p50_ms": ms(percentile(tally.ttfc, 50)),
            "ttfc_p99_ms": ms(percentile(tally.ttfc, 99)),
            "gap_p50_ms": ms(percentile(tally.gaps, 50)),
            "gap_p99_ms": ms(percentile(tally.gaps, 99)),
            "lines_per_read": tally.lines / tally.body_reads if tally.body_reads else None,
            "odd_reads": tally.odd_reads,
            "lines_per_chunk": tally.lines / tally.http_chunks if tally.http_chunks else None,
            "odd_chunks": tally.odd_chunks, "lines_lost": tally.lines_lost,
            "invalid_lines": tally.invalid_lines, "streams": tally.completed,
            "errors": tally.errors}


async def measure_fast(cluster: Cluster, target: str, opts: Options) -> Metrics:
    tally = await closed_loop(cluster.ports(target), FAST_STREAMS, opts.duration,
                              "/api/generate", GENERATE_STREAM,
                              functools.partial(count_stream, validate=False))
    return {"lines_per_s": tally.lines / tally.elapsed,
            "streams_per_s": tally.completed / tally.elapsed,
            "lines_lost": tally.lines_lost, "errors": tally.errors}


async def open_stream(port: int, raw: bytes) -> tuple[Connection | None, Reply | None]:
    """A stream that has delivered its first line (or failed to within the timeout)."""
    try:
        conn = await Connection.open(port)
    except OSError:
        return None, None
    reply = conn.send(raw)
    try:
        await asyncio.wait_for(asyncio.shield(reply.first_line), REQUEST_TIMEOUT)
    except asyncio.TimeoutError:
        reply.settle("no first line")
    return conn, reply


async def hold_and_release(ports: list[int], streams: int, settle: float,
                           pid: int | None = None
                           ) -> tuple[float | None, int, list[float]]:
    """Open `streams` streams at once, each to its first line; after `settle` seconds note
    the RSS of `pid` and the streams still healthy; close them all and let every hop wind
    them down."""
    gate = asyncio.Semaphore(HELD_OPENING)
    requests = {port: build_request(port, "/api/generate", GENERATE_STREAM) for port in ports}

    async def opened(i: int) -> tuple[Connection | None, Reply | None]:
        async with gate:
            port = ports[i % len(ports)]
            return await open_stream(port, requests[port])

    held = await asyncio.gather(*(opened(i) for i in range(streams)))
    try:
        await asyncio.sleep(settle)
        holding = rss_mb(pid) if pid else None
        healthy = sum(conn is not None and not conn.closed and reply is not None
                      and reply.error is None and bool(reply.line_times)
                      for conn, reply in held)
        ttfc = [reply.line_times[0] - reply.sent_at for _, reply in held
                if reply is not None and reply.line_times]
    finally:
        for conn, _ in held:
            if conn is not None:
                conn.close()
    await asyncio.sleep(settle)
    return holding, healthy, ttfc


async def measure_held(cluster: Cluster, target: str, opts: Options, streams: int) -> Metrics:
    """Hold `streams` generations open at once and weigh the proxy meanwhile. Each proxy
    starts afresh and warms up first: a process keeps the memory of an earlier peak, so
    growth is only visible from a process that never had one."""
    ports = cluster.ports(target)
    pid = None
    if target in cluster.proxies:
        cluster.restart(target)
        pid = cluster.proxies[target].pid
        await hold_and_release(ports, HELD_WARMUP, opts.settle)
    idle = rss_mb(pid) if pid else None
    holding, healthy, ttfc = await hold_and_release(ports, streams, opts.settle, pid)
    per_1000 = None if idle is None or holding is None else (holding - idle) / streams * 1000
    # Memory that comes back once the streams are gone: a few seconds for the process to
    # notice every close and hand freed pages back.
    await asyncio.sleep(opts.settle * AFTER_HELD_WAIT)
    after = rss_mb(pid) if pid else None
    return {"healthy": healthy, "unhealthy": streams - healthy,
            "ttfc_p99_ms": ms(percentile(ttfc, 99)), "idle_mb": idle,
            "holding_mb": holding, "mb_per_1000": per_1000, "after_mb": after,
            "errors": streams - healthy}


async def node_records(port: int) -> list[dict]:
    conn = await Connection.open(port)
    try:
        reply = await conn.fetch(build_request(port, "/_fake/requests"))
    finally:
        conn.close()
    return json.loads(reply.body) if reply.ok else []


async def upstream_closed_at(node_ports: list[int], marker: str) -> float | None:
    """When a node saw the client of the request carrying `marker` leave (wall clock)."""
    deadline = time.monotonic() + CLOSE_WAIT
    while time.monotonic() < deadline:
        for port in node_ports:
            for record in await node_records(port):
                if (record.get("json") or {}).get("prompt") == marker:
                    if record["client_closed_at"] is not None:
                        return record["client_closed_at"]
        await asyncio.sleep(0.05)  # the node's own timestamps make the polling rate moot
    return None


async def measure_disconnect(cluster: Cluster, target: str, opts: Options) -> Metrics:
    """Read a stream's first line, close the socket, and time how long until the node
    saw its own client (the proxy, or us when direct) go away."""
    delays: list[float] = []
    errors = unseen = 0
    ports = cluster.ports(target)
    for trial in range(opts.trials):
        port = ports[trial % len(ports)]
        marker = f"disconnect {target} {trial} {time.time()}"
        conn, reply = await open_stream(port, build_request(
            port, "/api/generate", {**GENERATE_STREAM, "prompt": marker}))
        if conn is None or reply is None or not reply.line_times:
            errors += 1
            if conn is not None:
                conn.close()
            continue
        closed_at = time.time()
        conn.close()
        seen = await upstream_closed_at(cluster.node_ports, marker)
        if seen is None:
            unseen += 1
        else:
            delays.append(seen - closed_at)
    return {"close_p50_ms": ms(percentile(delays, 50)),
            "close_max_ms": ms(max(delays)) if delays else None,
            "unseen": unseen, "errors": errors}


# ---------------------------------------------------------------- report layout


@dataclass(frozen=True)
class Target:
    """A goal for Aivonx from the performance issue, checked on the aivonx figure."""

    text: str
    kind: str  # "ratio>=": aivonx÷nginx at least; "<=": at most; "==": exactly
    bound: float

    def met(self, value: float | None, ratio: float | None) -> str:
        checked = ratio if self.kind == "ratio>=" else value
        if checked is None:
            return "n/a"
        ok = {"ratio>=": checked >= self.bound, "<=": checked <= self.bound,
              "==": checked == self.bound}[self.kind]
        return "yes" if ok else "**no**"


@dataclass(frozen=True)
class Row:
    label: str
    key: str
    digits: int = 1
    agg: str = "median"  # how repetitions combine: median, sum (counts) or max (worst case)
    ratios: bool = True
    target: Target | None = None


def zero(label: str, key: str) -> Row:
    """A count that must stay at zero."""
    return Row(label, key, 0, "sum", False, Target("0", "==", 0))


@dataclass
class Scenario:
    key: str
    title: str
    measure: Measure
    rows: list[Row]


@dataclass
class Phase:
    """A node configuration and the scenarios measured against it."""

    name: str
    node_args: list[str]
    warmup: tuple[str, dict]
    scenarios: list[Scenario]


def latency_rows() -> list[Row]:
    return [Row("latency p50 (ms)", "p50_ms", 2), Row("latency p99 (ms)", "p99_ms", 2),
            Row("added to latency p50 vs direct (ms)", "added_p50_ms", 2, ratios=False,
                target=Target("≤ 8 ms", "<=", 8))]


def build_phases(opts: Options) -> list[Phase]:
    small_target = Target("≥ 0.25× nginx", "ratio>=", 0.25)
    small = [Row("requests/s", "rps", 0, target=small_target), *latency_rows(),
             zero("errors", "errors")]
    held = [Scenario(
        f"held_{n}", f"d. Held streams: {n:,} open at once (first chunk, then silence); "
                     "RSS of the proxy process", functools.partial(measure_held, streams=n),
        [Row("healthy streams", "healthy", 0, ratios=False),
         zero("unhealthy streams", "unhealthy"),
         Row("time to first chunk p99 (ms)", "ttfc_p99_ms", 1,
             target=Target("≤ 100 ms", "<=", 100)),
         Row("RSS idle (MB)", "idle_mb", 1, target=Target("≤ 60 MB", "<=", 60)),
         Row("RSS holding (MB)", "holding_mb", 1),
         Row("MB per 1,000 streams", "mb_per_1000", 1, target=Target("≤ 40 MB", "<=", 40)),
         Row("RSS idle after they closed (MB)", "after_mb", 1,
             target=Target("≤ 60 MB", "<=", 60))])
        for n in opts.held]
    window = f"{opts.duration:g} s × {opts.reps}"
    return [
        Phase("small", ["--chunks", "1"], ("/api/embed", EMBED_SMALL), [
            Scenario("small_generate", f"a. Small requests: /api/generate (stream false), "
                     f"{SMALL_CONNECTIONS} connections, {window}",
                     functools.partial(measure_small, path="/api/generate",
                                       body=GENERATE_SMALL), small),
            Scenario("small_embed", f"a. Small requests: /api/embed, {SMALL_CONNECTIONS} "
                     f"connections, {window}",
                     functools.partial(measure_small, path="/api/embed", body=EMBED_SMALL),
                     small)]),
        Phase("paced", ["--chunks", str(STREAM_CHUNKS), "--chunk-delay", "0.01"],
              ("/api/generate", GENERATE_STREAM), [Scenario(
                  "paced", f"b. Paced streams: {PACED_STREAMS} concurrent, {STREAM_CHUNKS} "
                  f"chunks × 10 ms, {window}", measure_paced, [
                      Row("time to first chunk p50 (ms)", "ttfc_p50_ms", 2),
                      Row("time to first chunk p99 (ms)", "ttfc_p99_ms", 2),
                      Row("added to TTFC p50 vs direct (ms)", "added_ttfc_p50_ms", 2,
                          ratios=False, target=Target("≤ 3 ms", "<=", 3)),
                      Row("added to TTFC p99 vs direct (ms)", "added_ttfc_p99_ms", 2,
                          ratios=False, target=Target("≤ 10 ms", "<=", 10)),
                      Row("inter-chunk gap p50 (ms)", "gap_p50_ms", 2),
                      Row("inter-chunk gap p99 (ms)", "gap_p99_ms", 2),
                      Row("lines per network read", "lines_per_read", 3, ratios=False),
                      zero("reads not carrying exactly 1 line", "odd_reads"),
                      Row("lines per HTTP chunk", "lines_per_chunk", 3, ratios=False),
                      zero("HTTP chunks not holding exactly 1 line", "odd_chunks"),
                      zero("lines lost", "lines_lost"),
                      zero("lines not valid JSON", "invalid_lines"),
                      Row("streams completed", "streams", 0, "sum"),
                      zero("errors", "errors")])]),
        Phase("fast", ["--chunks", str(STREAM_CHUNKS)], ("/api/generate", GENERATE_STREAM), [
            Scenario("fast", f"c. Fast streams: {FAST_STREAMS} concurrent, {STREAM_CHUNKS} "
                     f"chunks, no delay, {window}", measure_fast, [
                         Row("lines/s", "lines_per_s", 0,
                             target=Target("≥ 0.4× nginx", "ratio>=", 0.4)),
                         Row("streams/s", "streams_per_s", 0),
                         zero("lines lost", "lines_lost"), zero("errors", "errors")])]),
        Phase("slow", ["--chunks", str(STREAM_CHUNKS), "--chunk-delay", str(SLOW_CHUNK_DELAY),
                       "--records", "1000"], ("/api/embed", EMBED_SMALL), [
            *held,
            Scenario("disconnect", f"e. Client disconnect after the first chunk: until the "
                     f"node saw its client leave, {opts.trials} trials × {opts.reps}",
                     measure_disconnect, [
                         Row("upstream closed after, p50 (ms)", "close_p50_ms", 2),
                         Row("upstream closed after, max (ms)", "close_max_ms", 2, "max",
                             target=Target("≤ 50 ms", "<=", 50)),
                         zero(f"not closed within {CLOSE_WAIT:g} s", "unseen"),
                         zero("errors", "errors")])]),
    ]


# ---------------------------------------------------------------- running


Results = dict[str, dict[str, list[Metrics]]]  # scenario -> target -> one entry a repetition


async def warm_up(cluster: Cluster, path: str, body: dict, seconds: float) -> None:
    """A short load on every target first: imports, connections and caches settle."""
    for target in cluster.targets:
        await closed_loop(cluster.ports(target), 4, seconds, path, body, count_plain)


async def run_phase(phase: Phase, cluster: Cluster, opts: Options, results: Results) -> None:
    await warm_up(cluster, *phase.warmup, min(1.0, opts.duration / 2))
    if phase.name == "small" and opts.wrk and "nginx" in cluster.proxy_ports:
        ceiling = await wrk_small(opts.wrk, [cluster.proxy_ports["nginx"]], opts.duration,
                                  "/_bench/ceiling", GENERATE_SMALL)
        CEILINGS.append(ceiling["rps"])
        log(f"load generator ceiling (nginx answering itself): {ceiling['rps']:,.0f} "
            "requests/s")
    for rep in range(opts.reps):
        for scenario in phase.scenarios:
            for target in cluster.targets:  # interleaved: drift hits every target alike
                metrics = await scenario.measure(cluster, target, opts)
                metrics["load_1min"] = os.getloadavg()[0]
                LOAD_SAMPLES.append(metrics["load_1min"])
                results.setdefault(scenario.key, {}).setdefault(target, []).append(metrics)
                log(f"rep {rep + 1}/{opts.reps} {scenario.key} {target}: "
                    + ", ".join(f"{k}={_fmt(v, 2)}" for k, v in metrics.items()))
            add_differences(results[scenario.key], rep)


ADDED = {"ttfc_p50_ms": "added_ttfc_p50_ms", "ttfc_p99_ms": "added_ttfc_p99_ms",
         "p50_ms": "added_p50_ms"}


def add_differences(by_target: dict[str, list[Metrics]], rep: int) -> None:
    """Time each proxy adds over direct access (to the first chunk, or to a small
    request's latency), in the same repetition."""
    direct = by_target.get("direct", [])
    if rep >= len(direct):
        return
    for target, runs in by_target.items():
        if target == "direct" or rep >= len(runs):
            continue
        for key, added in ADDED.items():
            if key in direct[rep]:
                mine, base = runs[rep].get(key), direct[rep][key]
                runs[rep][added] = None if mine is None or base is None else mine - base


def run_all(phases: list[Phase], opts: Options, targets: list[str], setup: Setup,
            children: Children, workdir: Path) -> Results:
    results: Results = {}
    for phase in phases:
        phase_dir = workdir / phase.name
        phase_dir.mkdir()
        log(f"phase {phase.name}: nodes with {' '.join(phase.node_args)}")
        cluster = start_cluster(children, phase_dir, phase.node_args, targets, setup)
        try:
            asyncio.run(run_phase(phase, cluster, opts, results))
        finally:
            children.stop(cluster.procs)
    return results


# ---------------------------------------------------------------- summarising


def _fmt(value: float | int | None, digits: int) -> str:
    if value is None:
        return "—"
    if isinstance(value, int):
        digits = 0
    elif digits == 0 and abs(value) < 10:
        digits = 1
    return f"{value:,.{digits}f}"


def aggregate(values: list[float | int | None], how: str) -> float | int | None:
    present = [v for v in values if v is not None]
    if not present:
        return None
    return {"median": statistics.median, "sum": sum, "max": max}[how](present)


def ratio_spread(mine: list[Metrics], base: list[Metrics], key: str
                 ) -> tuple[float, float, float] | None:
    """Median, min and max over the repetitions of mine÷base, each repetition on its own."""
    ratios = [m[key] / b[key] for m, b in zip(mine, base)
              if m.get(key) is not None and b.get(key)]
    if not ratios:
        return None
    return statistics.median(ratios), min(ratios), max(ratios)


def summarise(scenario: Scenario, by_target: dict[str, list[Metrics]]) -> list[dict]:
    """One entry per row: each target's figure, the ratios and whether the target is met."""
    rows = []
    for row in [*scenario.rows, Row("load average (1 min) after", "load_1min", 1, "max",
                                    ratios=False)]:
        figures = {t: aggregate([m.get(row.key) for m in runs], row.agg)
                   for t, runs in by_target.items()}
        ratios = {}
        if row.ratios and "aivonx" in by_target:
            for base in RATIO_BASES:
                if base in by_target:
                    ratios[base] = ratio_spread(by_target["aivonx"], by_target[base], row.key)
        versus_nginx = ratios.get("nginx")
        met = row.target.met(figures.get("aivonx"), versus_nginx and versus_nginx[0]) \
            if row.target and "aivonx" in by_target else ""
        rows.append({"label": row.label, "key": row.key, "digits": row.digits,
                     "figures": figures, "ratios": ratios,
                     "target": row.target.text if row.target else "", "met": met})
    return rows


RATIO_BASES = ("nginx", "base", "direct")  # what the aivonx figure is divided by


def markdown_table(title: str, rows: list[dict], targets: list[str]) -> str:
    shown = [t for t in TARGETS if t in targets]
    bases = [b for b in RATIO_BASES if b != "base" or "base" in targets]
    head = ["metric", *shown, *(f"aivonx ÷ {b}" for b in bases), "target", "met"]
    lines = [f"#### {title}", "", "| " + " | ".join(head) + " |",
             "|---" + "|---:" * (len(shown) + len(bases)) + "|---|---|"]
    for row in rows:
        cells = [row["label"], *(_fmt(row["figures"].get(t), row["digits"]) for t in shown)]
        for base in bases:
            spread = row["ratios"].get(base)
            cells.append("—" if spread is None
                         else f"{spread[0]:.2f} ({spread[1]:.2f}–{spread[2]:.2f})")
        cells += [row["target"], row["met"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine_info(nginx: str | None, load_at_start: float) -> dict[str, str]:
    """What the figures depend on; the load average says whether something else ran too."""
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    memory = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    nginx_version = "not available"
    if nginx:
        out = subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr
        nginx_version = out.strip().split("/")[-1]
    return {"cpu": model.group(1).strip() if model else platform.processor(),
            "cores": str(os.cpu_count()),
            "memory": f"{int(memory.group(1)) / 1024 ** 2:.0f} GiB" if memory else "?",
            "os": f"{platform.system()} {platform.release()}",
            "python": platform.python_version(),
            "tornado": importlib.metadata.version("tornado"),
            "nginx": nginx_version, "aivonx": _git_state(),
            "load average (1 min) at start → end":
                f"{load_at_start:.1f} → {os.getloadavg()[0]:.1f}"
                + (f" (max {max(LOAD_SAMPLES):.1f} between measurements)"
                   if LOAD_SAMPLES else "")}


def _git_state() -> str:
    """The commit measured, flagged when the aivonx package differs from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip()
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + (" + uncommitted changes" if git("status", "--porcelain", "aivonx") else "")


def report(phases: list[Phase], results: Results, targets: list[str], machine: dict[str, str],
           command: str, notes: list[str]) -> tuple[str, dict]:
    parts = [f"Command: `{command}`", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()), ""]
    parts += [f"Note: {note}" for note in notes]
    summary = {}
    for scenario in (s for phase in phases for s in phase.scenarios):
        if scenario.key in results:
            rows = summarise(scenario, results[scenario.key])
            summary[scenario.key] = rows
            parts += ["", markdown_table(scenario.title, rows, targets)]
    errors = {t: sum(m.get("errors") or 0 for runs in results.values() for m in runs.get(t, []))
              for t in targets}
    parts += ["", "errors: " + " ".join(f"{t}={n}" for t, n in errors.items())]
    data = {"command": command, "machine": machine, "notes": notes, "runs": results,
            "summary": summary, "errors": errors}
    return "\n".join(parts), data


# ---------------------------------------------------------------- command line


def find_nginx(install: bool) -> str | None:
    """The nginx binary; installed from Debian's packages when missing and `install`."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    if found or not install:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None
    log("nginx missing: installing it with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run = functools.partial(subprocess.run, stdout=sys.stderr, stderr=sys.stderr, env=env,
                            timeout=900)
    try:
        run(["apt-get", "update"])
        for package in ("nginx-light", "nginx"):
            if run(["apt-get", "install", "-y", package]).returncode == 0:
                break
    except subprocess.TimeoutExpired:
        return None
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a short run (about half a minute); never installs nginx")
    parser.add_argument("--targets", default=",".join(TARGETS),
                        help="comma-separated subset of direct,aivonx,nginx (base "
                             "joins with --base-commit)")
    parser.add_argument("--base-commit", metavar="REV",
                        help="also measure Aivonx as of this commit (target base), "
                             "interleaved with the current one, e.g. 72933bf")
    parser.add_argument("--workers", type=int, default=1,
                        help="--workers of the Aivonx processes (default 1)")
    parser.add_argument("--fake-nodes", action="store_true",
                        help="the tests' Tornado fake nodes instead of benchmarks/fastnode.py "
                             "(they cap the direct figure near 2,000 requests/s)")
    parser.add_argument("--no-wrk", action="store_true",
                        help="small requests through the Python client even if wrk is there")
    parser.add_argument("--scenarios", default="small,paced,fast,slow",
                        help="phases to run: small (a), paced (b), fast (c), slow (d and e)")
    parser.add_argument("--reps", type=int, help="repetitions (default 3; quick 1)")
    parser.add_argument("--duration", type=float,
                        help="seconds per measurement of a, b, c (default 5; quick 1)")
    parser.add_argument("--held", help="held stream counts (default 1000,2000; quick 100)")
    parser.add_argument("--trials", type=int, help="disconnects per repetition "
                                                   "(default 20; quick 5)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    unknown = set(args.targets.split(",")) - set(TARGETS)
    if unknown or "direct" not in args.targets.split(","):
        parser.error("--targets must include direct and name only direct, aivonx, base, "
                     "nginx")
    if args.base_commit and "base" not in args.targets.split(","):
        args.targets += ",base"
    if "base" in args.targets.split(",") and not args.base_commit:
        parser.error("the base target needs --base-commit")
    return args


def options_from(args: argparse.Namespace) -> Options:
    quick = args.quick
    held = args.held or ("100" if quick else "1000,2000")
    return Options(reps=args.reps or (1 if quick else 3),
                   duration=args.duration or (1.0 if quick else 5.0),
                   held=[int(n) for n in held.split(",")],
                   trials=args.trials or (5 if quick else 20),
                   settle=0.3 if quick else 1.0,
                   wrk=None if args.no_wrk else shutil.which("wrk"))


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop children


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    opts = options_from(args)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    raise_nofile_limit()
    targets = args.targets.split(",")
    notes = []
    nginx = find_nginx(install=not args.quick) if "nginx" in targets else None
    if "nginx" in targets and nginx is None:
        targets.remove("nginx")
        notes.append("nginx is not available; it was left out.")
    if "small" in args.scenarios.split(","):
        notes.append("small requests driven by " + (
            f"wrk ({WRK_THREADS} threads, {SMALL_CONNECTIONS} connections)" if opts.wrk else
            "the Python client (wrk is not installed: `apt-get install wrk`), which caps "
            "the direct figure well below what the nodes take"))
    notes.append("nodes: " + ("tests/fakes/fake_ollama.py (Tornado), which caps the direct "
                              "figure" if args.fake_nodes else "benchmarks/fastnode.py"))
    if args.workers != 1:
        notes.append(f"Aivonx runs with --workers {args.workers}.")
    wanted = args.scenarios.split(",")
    phases = [p for p in build_phases(opts) if p.name in wanted]
    workdir = Path(tempfile.mkdtemp(prefix="aivonx-bench-"))
    children = Children()
    load_at_start = os.getloadavg()[0]
    try:
        setup = Setup(nginx=nginx, workers=args.workers, wrk=opts.wrk,
                      fast_nodes=not args.fake_nodes)
        if args.base_commit:
            setup.base_root = export_commit(args.base_commit, workdir)
            notes.append(f"base is Aivonx at commit {args.base_commit}, exported with "
                         "git archive and run from its own tree.")
        results = run_all(phases, opts, targets, setup, children, workdir)
    finally:
        children.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    if CEILINGS:
        notes.append(f"load generator ceiling: wrk drove {max(CEILINGS):,.0f} requests/s "
                     "against nginx answering by itself (no node behind it), so the direct "
                     "figure is what the nodes take, not what the client can send.")
    command = "python benchmarks/bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text, data = report(phases, results, targets, machine_info(nginx, load_at_start),
                        command.strip(), notes)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=2))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the children were stopped on the way out
        sys.exit(130)
