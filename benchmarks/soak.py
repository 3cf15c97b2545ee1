#!/usr/bin/env python3
"""A bounded soak: minutes of mixed traffic through Aivonx while its nodes are killed, hung,
slowed and flapped and hostile clients (benchmarks/hostile.py: slow bodies, login bursts,
48 MB bodies) run alongside; every request's outcome is classified and the proxy's memory
followed.

    python benchmarks/soak.py                    # 10 minutes
    python benchmarks/soak.py --minutes 0.5      # a quick run
    python benchmarks/soak.py --json soak.json   # the figures as JSON as well

Three fake Ollama nodes (tests/fakes/fake_ollama.py) run as separate processes on
127.0.0.1, Aivonx (run.py, its own temporary database, `--health-interval 1`) in front
of them. This process drives everything with one asyncio loop: the load generator (the
HTTP/1.1 client of bench.py), the fault schedule (signals to the nodes' processes) and
a sampler of the proxy's RSS and /metrics. The fault schedule never takes a node down
unless the proxy shows another node serving, so that every request could have been
served by some node: the target is zero lost requests.

The Markdown summary goes to stdout, progress to stderr. The exit status is 0 only if
nothing was lost, the proxy's memory stayed flat, every hostile client got the expected
answer, and in-flight requests and the wait queue were back at 0 once the traffic stopped.
See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import hostile
from bench import (Children, Connection, Reply, _exit_on_sigterm, build_request,
                   listening_port, machine_info, node_command, prepare_aivonx,
                   raise_nofile_limit, rss_mb, start_nodes)

NODES = 3
CHUNKS = 10  # content chunks of every generation, then the final one
CHUNK_DELAY = 0.02
SLOW_CHUNK_DELAY = 0.2  # a node restarted slow: two seconds a generation
EXPECTED_TEXT = "".join(f"tok{i} " for i in range(CHUNKS))
EMBED_DIM = 8
WORKERS = 20
# Aivonx's default is 4 a node (Ollama's parallelism): 12 for 20 workers would keep the
# wait queue full all the time. With 8 the queue holds requests only while a node is
# down or hung, which is when it matters.
SLOTS = 8
REQUEST_TIMEOUT = 60.0  # far above a hang (seconds) and a slow node's generation (2 s)
CONNECT_TIMEOUT = 10.0
MAX_REQUESTS_PER_WORKER = 1_000_000
MAX_FAULTS = 10_000
WARMUP = 30.0  # seconds of traffic before the memory baseline (at most a quarter of a run)
SAMPLE_EVERY = 5.0
SETTLE_TIMEOUT = 20.0  # after the traffic: in-flight and queue depth must reach 0 by then
MAX_GROWTH_MB = 20.0
MAX_SLOPE_MB_PER_MIN = 1.0
SLOPE_MIN_WINDOW = 60.0  # a slope over less than this is noise: reported, not judged
OTHER_NODE_WAIT = 30.0  # how long a fault waits for another node to be serving
REJOIN_GRACE = 3.0  # a node running again for this long should be serving (probes every 1 s)
LOST_SAMPLES = 40  # lost requests described in full
BODY_TIMEOUT = 2.0  # the proxy's --body-timeout here, so that slow-body clients cycle
SLOW_CLIENTS = 50
BIG_BODY_MB = 48.0
START_ATTEMPTS = 40  # restarts of a node on its port (the port may linger a moment)

COMPLETED = "completed"
ERROR_ENDED = "ended with explicit error"
REFUSED = "refused (503 + Retry-After)"
CLOSED_EARLY = "closed early on purpose"
LOST = "lost"
OUTCOMES = (COMPLETED, ERROR_ENDED, REFUSED, CLOSED_EARLY, LOST)


def say(message: str) -> None:
    """Progress goes to stderr, so stdout holds only the summary."""
    print(f"[soak] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- what a good answer is


Verdict = tuple[str, str]  # outcome, detail


def _events_ndjson(body: bytes) -> tuple[list[Any], str | None]:
    """Every complete line parsed; a problem if one is not JSON."""
    events = []
    for number, line in enumerate(body.split(b"\n")[:-1]):
        try:
            events.append(json.loads(line))
        except ValueError:
            return events, f"line {number} is not JSON: {line[:120]!r}"
    return events, None


def _events_sse(body: bytes) -> tuple[list[Any], str | None]:
    """Every complete `data:` event parsed ("[DONE]" stays a string)."""
    events: list[Any] = []
    for number, event in enumerate(body.split(b"\n\n")[:-1]):
        if not event.startswith(b"data: "):
            return events, f"event {number} is not a data event: {event[:120]!r}"
        payload = event[len(b"data: "):]
        if payload == b"[DONE]":
            events.append("[DONE]")
            continue
        try:
            events.append(json.loads(payload))
        except ValueError:
            return events, f"event {number} is not JSON: {event[:120]!r}"
    return events, None


def _text(event: Any, *path: str | int) -> str:
    for step in path:
        try:
            event = event[step]
        except (KeyError, IndexError, TypeError):
            return ""
    return event if isinstance(event, str) else ""


def _stream_verdict(reply: Reply, events: list[Any], problem: str | None, finished: bool,
                    text: str) -> Verdict:
    """What a stream amounts to once parsed: the whole answer, an explicit error at its
    end, or lost."""
    if problem:
        return LOST, problem
    last = events[-1] if events else None
    if isinstance(last, dict) and "error" in last:
        return ERROR_ENDED, json.dumps(last["error"])[:200]
    if reply.error:
        return LOST, f"cut after {len(events)} events, no error line: {reply.error}"
    if any(isinstance(e, dict) and "error" in e for e in events):
        return LOST, "an error event before the end"
    if not finished:
        return LOST, f"ended after {len(events)} events without its final one"
    if text != EXPECTED_TEXT:
        return LOST, f"content differs: {text[:100]!r}"
    return COMPLETED, ""


def check_ndjson(reply: Reply, field_path: tuple[str, ...]) -> Verdict:
    events, problem = _events_ndjson(bytes(reply.body))
    finished = bool(events) and isinstance(events[-1], dict) and events[-1].get("done") is True
    text = "".join(_text(e, *field_path) for e in events)
    return _stream_verdict(reply, events, problem, finished, text)


def check_sse(reply: Reply) -> Verdict:
    events, problem = _events_sse(bytes(reply.body))
    finished = bool(events) and events[-1] == "[DONE]"
    text = "".join(_text(e, "choices", 0, "delta", "content") for e in events)
    return _stream_verdict(reply, events, problem, finished, text)


def check_json(reply: Reply, problem_of: Callable[[Any], str | None]) -> Verdict:
    if reply.error:
        return LOST, f"body cut after {len(reply.body)} bytes: {reply.error}"
    try:
        value = json.loads(bytes(reply.body))
    except ValueError:
        return LOST, f"body is not JSON: {bytes(reply.body[:120])!r}"
    problem = problem_of(value)
    return (LOST, problem) if problem else (COMPLETED, "")


def _generated(value: Any) -> str | None:
    if value.get("done") is not True or value.get("response") != EXPECTED_TEXT:
        return f"not a whole generation: {json.dumps(value)[:150]}"
    return None


def _chatted(value: Any) -> str | None:
    if value.get("done") is not True or _text(value, "message", "content") != EXPECTED_TEXT:
        return f"not a whole chat answer: {json.dumps(value)[:150]}"
    return None


def _embedded(value: Any) -> str | None:
    vectors = value.get("embeddings")
    if not (isinstance(vectors, list) and len(vectors) == 1 and len(vectors[0]) == EMBED_DIM):
        return f"not one embedding: {json.dumps(value)[:150]}"
    return None


def _completed_v1(value: Any) -> str | None:
    if _text(value, "choices", 0, "message", "content") != EXPECTED_TEXT:
        return f"not a whole completion: {json.dumps(value)[:150]}"
    return None


def _listing(value: Any) -> str | None:
    if not isinstance(value, dict) or not isinstance(value.get("models"), list):
        return f"not a model listing: {json.dumps(value)[:150]}"
    return None


# ---------------------------------------------------------------- the traffic mix


CHAT_MESSAGES = [{"role": "user", "content": "why is the sky blue"}]


@dataclass(frozen=True)
class Kind:
    name: str
    path: str
    body: dict | None  # None: a GET
    weight: int
    check: Callable[[Reply], Verdict]
    close_early: bool = False  # read the first line, then hang up


KINDS = [
    Kind("/api/generate stream", "/api/generate", {"model": "llama3", "prompt": "hi"}, 16,
         lambda r: check_ndjson(r, ("response",))),
    Kind("/api/generate", "/api/generate", {"model": "llama3", "prompt": "hi", "stream": False},
         8, lambda r: check_json(r, _generated)),
    Kind("/api/chat stream", "/api/chat", {"model": "llama3", "messages": CHAT_MESSAGES}, 14,
         lambda r: check_ndjson(r, ("message", "content"))),
    Kind("/api/chat", "/api/chat", {"model": "llama3", "messages": CHAT_MESSAGES,
                                    "stream": False}, 8, lambda r: check_json(r, _chatted)),
    Kind("/api/embed", "/api/embed", {"model": "nomic-embed-text", "input": "hello world"}, 10,
         lambda r: check_json(r, _embedded)),
    Kind("/v1/chat/completions SSE", "/v1/chat/completions",
         {"model": "llama3", "messages": CHAT_MESSAGES, "stream": True}, 12, check_sse),
    Kind("/v1/chat/completions", "/v1/chat/completions",
         {"model": "llama3", "messages": CHAT_MESSAGES}, 8,
         lambda r: check_json(r, _completed_v1)),
    Kind("/api/tags", "/api/tags", None, 6, lambda r: check_json(r, _listing)),
    Kind("/api/ps", "/api/ps", None, 6, lambda r: check_json(r, _listing)),
    Kind("/api/generate stream, closed early", "/api/generate",
         {"model": "llama3", "prompt": "hi"}, 6, lambda r: check_ndjson(r, ("response",)),
         close_early=True),
    Kind("/v1/chat/completions SSE, closed early", "/v1/chat/completions",
         {"model": "llama3", "messages": CHAT_MESSAGES, "stream": True}, 6, check_sse,
         close_early=True),
]


def classify(kind: Kind, reply: Reply) -> Verdict:
    if reply.status == 0:
        return LOST, f"no response: {reply.error}"
    if reply.status != 200:
        body = bytes(reply.body[:200]).decode("utf-8", "replace")
        if reply.status == 503 and "retry-after" in reply.headers:
            return REFUSED, body
        return LOST, f"HTTP {reply.status} ({reply.error or 'complete'}): {body}"
    return kind.check(reply)


# ---------------------------------------------------------------- bookkeeping


@dataclass
class Fault:
    kind: str
    node: int
    start: float  # seconds since the traffic began
    end: float | None = None
    note: str = ""


@dataclass
class Sample:
    t: float
    rss_mb: float
    queue_depth: float | None
    in_flight: float | None
    active_nodes: int | None
    nodes: list[dict] | None = None  # port, status and reason of each node, as the proxy sees it


@dataclass
class Run:
    """Everything observed, shared by the workers, the fault schedule and the sampler."""

    began: float  # time.monotonic() when the traffic began
    began_wall: float
    stop: asyncio.Event
    counts: dict[str, Counter] = field(default_factory=dict)
    refusals: Counter = field(default_factory=Counter)
    lost: list[dict] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    actions: Counter = field(default_factory=Counter)  # SIGKILL, SIGSTOP, restarts
    incomplete_tags: int = 0  # /api/tags answers lacking a model some node had all along

    def now(self) -> float:
        return time.monotonic() - self.began

    def record(self, kind: Kind, sent: float, reply: Reply | None, outcome: str,
               detail: str) -> None:
        self.counts.setdefault(kind.name, Counter())[outcome] += 1
        if outcome == REFUSED:
            self.refusals[detail[:80]] += 1
        if outcome == LOST and len(self.lost) < LOST_SAMPLES:
            ended = self.now()
            self.lost.append({
                "kind": kind.name, "sent_s": round(sent, 3), "ended_s": round(ended, 3),
                "sent_at": _wall(self.began_wall + sent), "status": reply.status if reply else 0,
                "node": reply.headers.get("x-aivonx-node") if reply else None,
                "detail": detail, "body_tail": bytes(reply.body[-300:]).decode(
                    "utf-8", "replace") if reply else "",
                "faults": [f"{f.kind} node{f.node} {f.start:.1f}–"
                           f"{'…' if f.end is None else f'{f.end:.1f}'} s"
                           for f in self.faults if f.start <= ended + 1
                           and (f.end is None or f.end >= sent - 1)]})

    def total(self, outcome: str | None = None) -> int:
        return sum(c[outcome] if outcome else sum(c.values()) for c in self.counts.values())


def _wall(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds).strftime("%H:%M:%S.%f")[:-3]


# ---------------------------------------------------------------- HTTP helpers


async def get(port: int, path: str, timeout: float = 5.0) -> Reply | None:
    """One GET on a fresh connection; None if the connection could not be made."""
    try:
        conn = await asyncio.wait_for(Connection.open(port), timeout)
    except (OSError, asyncio.TimeoutError):
        return None
    try:
        return await conn.fetch(build_request(port, path), timeout)
    finally:
        conn.close()


def parse_metrics(text: str) -> dict[str, dict[str, float]]:
    """Prometheus' text format: metric name -> label set -> value."""
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        match = re.match(r"^([a-zA-Z_:][\w:]*)(\{.*\})?\s+(\S+)$", line)
        if match and not line.startswith("#"):
            out.setdefault(match.group(1), {})[match.group(2) or ""] = float(match.group(3))
    return out


async def proxy_metrics(port: int) -> dict[str, dict[str, float]] | None:
    reply = await get(port, "/metrics")
    if reply is None or not reply.ok:
        return None
    return parse_metrics(bytes(reply.body).decode("utf-8", "replace"))


async def node_views(port: int) -> list[dict] | None:
    """Each node's port, status (active = the proxy routes to it) and reason, right now."""
    reply = await get(port, "/api/proxy/state")
    if reply is None or not reply.ok:
        return None
    try:
        state = json.loads(bytes(reply.body))
        return [{"port": int(n["port"]), "status": n.get("status"),
                 "reason": str(n.get("reason"))[:200]} for n in state["nodes"]]
    except (ValueError, KeyError, TypeError):
        return None


def active_ports(views: list[dict] | None) -> set[int] | None:
    return None if views is None else {v["port"] for v in views if v["status"] == "active"}


# ---------------------------------------------------------------- load


async def exchange(conn: Connection, kind: Kind, raw: bytes) -> tuple[Reply, bool]:
    """One request; for a kind that closes early, hang up once the first line of a healthy
    stream arrived. Returns the reply and whether we hung up."""
    if not kind.close_early:
        return await conn.fetch(raw, REQUEST_TIMEOUT), False
    reply = conn.send(raw)
    try:
        await asyncio.wait_for(asyncio.shield(reply.first_line), REQUEST_TIMEOUT)
    except asyncio.TimeoutError:
        reply.settle("timeout before the first line")
        conn.close()
        return reply, False
    first = bytes(reply.body.split(b"\n", 1)[0])
    if reply.done.done() or reply.status != 200 or b'"error"' in first:
        try:  # an answer to judge as a whole, not one to walk away from
            await asyncio.wait_for(asyncio.shield(reply.done), REQUEST_TIMEOUT)
        except asyncio.TimeoutError:
            reply.settle("timeout")
            conn.close()
        return reply, False
    conn.close()
    return reply, True


async def worker(run: Run, port: int, rng: random.Random, stop_at: float) -> None:
    requests = {kind.name: build_request(port, kind.path, kind.body) for kind in KINDS}
    weights = [kind.weight for kind in KINDS]
    conn: Connection | None = None
    for _ in range(MAX_REQUESTS_PER_WORKER):
        if time.monotonic() >= stop_at:
            break
        kind = rng.choices(KINDS, weights)[0]
        sent = run.now()
        if conn is None or conn.closed:
            try:
                conn = await asyncio.wait_for(Connection.open(port), CONNECT_TIMEOUT)
            except (OSError, asyncio.TimeoutError) as exc:
                run.record(kind, sent, None, LOST, f"cannot connect to aivonx: {exc!r}")
                await asyncio.sleep(0.2)
                continue
        reply, hung_up = await exchange(conn, kind, requests[kind.name])
        if hung_up:
            run.record(kind, sent, reply, CLOSED_EARLY, "")
            continue
        outcome, detail = classify(kind, reply)
        run.record(kind, sent, reply, outcome, detail)
        if kind.path == "/api/tags" and outcome == COMPLETED:
            names = {m.get("name") for m in json.loads(bytes(reply.body))["models"]}
            run.incomplete_tags += not {"llama3:latest", "nomic-embed-text:latest"} <= names
    if conn is not None:
        conn.close()


# ---------------------------------------------------------------- faults


class Nodes:
    """The fake nodes' processes: killed, stopped, continued and restarted on their ports."""

    def __init__(self, children: Children, workdir: Path, ports: list[int],
                 procs: list[subprocess.Popen], run: Run) -> None:
        self.children, self.workdir, self.ports, self.procs = children, workdir, ports, procs
        self.run = run
        self.stopped = [False] * len(ports)
        self.dead = [False] * len(ports)
        self.slow = [False] * len(ports)
        self.starts = 0

    @staticmethod
    def args(slow: bool) -> list[str]:
        return ["--chunks", str(CHUNKS), "--chunk-delay",
                str(SLOW_CHUNK_DELAY if slow else CHUNK_DELAY), "--embed-dim", str(EMBED_DIM)]

    async def kill(self, i: int) -> None:
        proc = self.procs[i]
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.run.actions["SIGKILL"] += 1
        for _ in range(500):  # reaped within milliseconds; bounded anyway
            if proc.poll() is not None:
                break
            await asyncio.sleep(0.01)
        if proc in self.children.procs:
            self.children.procs.remove(proc)
        self.dead[i], self.stopped[i] = True, False

    async def start(self, i: int, slow: bool = False) -> None:
        """A new process on the node's port; retried while the port is not free yet."""
        for _ in range(START_ATTEMPTS):
            self.starts += 1
            proc, log_path = self.children.start(
                f"node{i}.{self.starts}", node_command(self.ports[i], self.args(slow)),
                self.workdir)
            self.procs[i] = proc
            for _ in range(400):  # 20 s at most
                if listening_port(log_path) or proc.poll() is not None:
                    break
                await asyncio.sleep(0.05)
            if listening_port(log_path):
                self.run.actions["restart"] += 1
                self.dead[i], self.slow[i] = False, slow
                return
            await self.kill(i)
            self.run.actions["SIGKILL"] -= 1  # a failed start, not a fault
            await asyncio.sleep(0.25)
        raise RuntimeError(f"node{i} could not be restarted on port {self.ports[i]}")

    def hang(self, i: int) -> None:
        os.kill(self.procs[i].pid, signal.SIGSTOP)
        self.run.actions["SIGSTOP"] += 1
        self.stopped[i] = True

    def resume(self, i: int) -> None:
        if self.stopped[i]:
            os.kill(self.procs[i].pid, signal.SIGCONT)
            self.run.actions["SIGCONT"] += 1
            self.stopped[i] = False

    def resume_all(self) -> None:
        """Never leave a node stopped: a stopped process ignores SIGTERM."""
        for i in range(len(self.procs)):
            try:
                self.resume(i)
            except ProcessLookupError:
                pass


@dataclass
class Plan:
    """The fault schedule's pace, in seconds (scaled down for short runs)."""

    first: float
    down: float  # a killed node stays down this long
    hang: float  # SIGSTOP to SIGCONT
    slow_for: float  # a node restarted slow serves that long before it is restarted normal
    flaps: int
    flap_down: float
    flap_up: float
    gap: float  # calm between two faults

    @classmethod
    def for_duration(cls, seconds: float) -> "Plan":
        scale = min(1.0, max(0.25, seconds / 180))
        return cls(first=min(10.0, 0.1 * seconds), down=6 * scale, hang=5 * scale,
                   slow_for=12 * scale, flaps=4, flap_down=0.5, flap_up=1.5 * scale,
                   gap=4 * scale)


FAULT_KINDS = ("kill", "hang", "slow", "flap")


async def pause(run: Run, seconds: float) -> bool:
    """Sleep, waking when the run stops; True if it is still going."""
    try:
        await asyncio.wait_for(run.stop.wait(), seconds)
    except asyncio.TimeoutError:
        pass
    return not run.stop.is_set()


async def another_node_serving(run: Run, proxy_port: int, nodes: Nodes, target: int) -> bool:
    """Wait (bounded) until the proxy routes to some node other than `target`: a fault is
    injected only when another node could take the traffic."""
    deadline = time.monotonic() + OTHER_NODE_WAIT
    others = {p for i, p in enumerate(nodes.ports) if i != target}
    while time.monotonic() < deadline and not run.stop.is_set():
        active = active_ports(await node_views(proxy_port))
        if active and active & others:
            return True
        await pause(run, 0.25)
    return False


async def inject_faults(run: Run, nodes: Nodes, proxy_port: int, plan: Plan) -> None:
    """Kill, hang, slow down and flap the nodes in turn, one fault at a time, until the
    run stops; every fault leaves its node running at normal pace again."""
    if not await pause(run, plan.first):
        return
    for number in range(MAX_FAULTS):
        kind, target = FAULT_KINDS[number % len(FAULT_KINDS)], number % NODES
        if not await another_node_serving(run, proxy_port, nodes, target):
            if run.stop.is_set():
                return
            run.faults.append(Fault("skipped", target, run.now(), run.now(),
                                    f"no other node served for {OTHER_NODE_WAIT:g} s"))
            say(f"fault {kind} on node{target} skipped: the proxy routes to no other node")
            continue
        fault = Fault(kind, target, run.now())
        run.faults.append(fault)
        try:
            if kind == "kill":
                await nodes.kill(target)
                await pause(run, plan.down)
                await nodes.start(target)
            elif kind == "hang":
                nodes.hang(target)
                await pause(run, plan.hang)
                nodes.resume(target)
            elif kind == "slow":
                await nodes.kill(target)
                await nodes.start(target, slow=True)
                await pause(run, plan.slow_for)
                await nodes.kill(target)
                await nodes.start(target)
            else:
                flapped = 0
                for _ in range(plan.flaps):
                    await nodes.kill(target)
                    await pause(run, plan.flap_down)
                    await nodes.start(target)
                    flapped += 1
                    if not await pause(run, plan.flap_up):
                        break
                fault.note = f"{flapped}× down {plan.flap_down:g} s"
        finally:
            nodes.resume(target)
            if nodes.dead[target] or nodes.slow[target]:
                if not nodes.dead[target]:
                    await nodes.kill(target)
                await nodes.start(target)
            fault.end = run.now()
        if not await pause(run, plan.gap):
            return


# ---------------------------------------------------------------- sampling


async def sample(run: Run, proxy_pid: int, proxy_port: int) -> Sample:
    metrics = await proxy_metrics(proxy_port)
    views = await node_views(proxy_port)
    depth = in_flight = None
    if metrics:
        depth = metrics.get("aivonx_queue_depth", {}).get("")
        in_flight = sum(metrics.get("aivonx_in_flight_requests", {}).values())
    active = active_ports(views)
    return Sample(round(run.now(), 2), round(rss_mb(proxy_pid), 2), depth, in_flight,
                  None if active is None else len(active), views)


async def sampler(run: Run, proxy_pid: int, proxy_port: int, every: float,
                  duration: float) -> None:
    reported = 0.0
    for _ in range(int(duration / every) + 2):
        run.samples.append(await sample(run, proxy_pid, proxy_port))
        if run.now() - reported >= 30:
            reported = run.now()
            say(f"{run.now():.0f} s: {run.total()} requests, {run.total(LOST)} lost, "
                f"RSS {run.samples[-1].rss_mb:.1f} MB, faults {len(run.faults)}")
        if not await pause(run, every):
            return


async def settle(run: Run, proxy_pid: int, proxy_port: int) -> tuple[Sample | None, float]:
    """After the traffic: wait until nothing is in flight or queued; the last sample and
    how long that took."""
    started = time.monotonic()
    last = None
    while time.monotonic() - started < SETTLE_TIMEOUT:
        last = await sample(run, proxy_pid, proxy_port)
        if last.in_flight == 0 and last.queue_depth == 0:
            break
        await asyncio.sleep(0.25)
    return last, time.monotonic() - started


# ---------------------------------------------------------------- one run


def big_kinds(port: int, size: int) -> list[hostile.BigKind]:
    """The big bodies: a long embedding input, and a generation with a base64 image; their
    answers are judged as the normal traffic's are."""
    mb = f"{size / 2 ** 20:g} MB"
    embed = Kind(f"{mb} /api/embed input", "/api/embed", None, 0,
                 lambda r: check_json(r, _embedded))
    generate = Kind(f"{mb} /api/generate image", "/api/generate", None, 0,
                    lambda r: check_json(r, _generated))
    return [
        hostile.BigKind(embed.name, hostile.big_request(
            port, "/api/embed", {"model": "nomic-embed-text"}, "input", size),
            lambda r: classify(embed, r)),
        hostile.BigKind(generate.name, hostile.big_request(
            port, "/api/generate", {"model": "llama3", "prompt": "hi", "stream": False},
            "images", size, in_list=True), lambda r: classify(generate, r))]


async def soak(duration: float, workers: int, seed: int, nodes_of: Callable[[Run], Nodes],
               proxy: subprocess.Popen, proxy_port: int, hostile_plan: hostile.Plan
               ) -> tuple[Run, dict, hostile.Results]:
    run = Run(time.monotonic(), time.time(), asyncio.Event())
    nodes = nodes_of(run)
    attackers = hostile.Hostile(
        hostile_plan, proxy_port, proxy.pid, os.environ["AIVONX_ROOT_PASSWORD"],
        big_kinds(proxy_port, hostile_plan.big_bytes) if hostile_plan.big_every else [],
        run.now, run.stop)
    plan = Plan.for_duration(duration)
    every = min(SAMPLE_EVERY, max(1.0, duration / 30))
    stop_at = run.began + duration
    say(f"{duration:g} s of traffic from {workers} workers; faults from {plan.first:.1f} s "
        f"on, {plan.gap:.1f} s apart")
    faults = asyncio.ensure_future(inject_faults(run, nodes, proxy_port, plan))
    sampling = asyncio.ensure_future(sampler(run, proxy.pid, proxy_port, every, duration))
    attacks = attackers.tasks()
    try:
        await asyncio.gather(*(worker(run, proxy_port, random.Random(seed * 1000 + i), stop_at)
                               for i in range(workers)))
        traffic_s = run.now()
        run.stop.set()
        await faults
        await sampling
        await asyncio.gather(*attacks)  # each ends by itself, within its own timeouts
        ended, settle_s = await settle(run, proxy.pid, proxy_port)
        final_metrics = await proxy_metrics(proxy_port)
    finally:
        run.stop.set()
        for task in (faults, sampling, *attacks):
            task.cancel()
        nodes.resume_all()
    after = {"traffic_s": traffic_s, "settle_s": settle_s,
             "in_flight": ended.in_flight if ended else None,
             "queue_depth": ended.queue_depth if ended else None,
             "rss_mb": ended.rss_mb if ended else None,
             "proxy_alive": proxy.poll() is None, "metrics": final_metrics or {}}
    return run, after, attackers.results


# ---------------------------------------------------------------- memory and the verdict


def slope_mb_per_min(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, MB) points, in MB per minute."""
    if len(points) < 3:
        return None
    xs, ys = zip(*points)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if not sxx:
        return None
    return 60 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx


def memory(samples: list[Sample], duration: float, warmup: float,
           big_windows: list[tuple[float, float]] = ()) -> dict:
    """The flatness figures, from the samples taken while no big body was under way or
    its memory not yet back (those are reported on their own)."""
    near_big = {id(s) for s in samples
                if any(start - 0.5 <= s.t <= end + 0.5 for start, end in big_windows)}
    during = [s for s in samples if s.t <= duration + 1 and id(s) not in near_big]
    settled = [s for s in during if s.t >= warmup] or during
    second_half = [(s.t, s.rss_mb) for s in during if s.t >= duration / 2]
    window = second_half[-1][0] - second_half[0][0] if second_half else 0.0
    base = settled[0].rss_mb
    return {"warmup_s": warmup, "start_mb": base,
            "min_mb": min(s.rss_mb for s in settled), "max_mb": max(s.rss_mb for s in settled),
            "last_mb": settled[-1].rss_mb, "growth_mb": settled[-1].rss_mb - base,
            "peak_mb": max(s.rss_mb for s in during),
            "slope_mb_per_min": slope_mb_per_min(second_half), "slope_window_s": window,
            "samples": len(during), "samples_near_big_bodies": len(near_big)}


def out_of_rotation(run: Run, ports: list[int]) -> dict:
    """How often the proxy did not route to a node whose process had been running
    normally for REJOIN_GRACE seconds (no fault on it under way), and why it said so."""
    windows = {i: [(f.start, (f.end if f.end is not None else math.inf) + REJOIN_GRACE)
                   for f in run.faults if f.node == i and f.kind != "skipped"]
               for i in range(len(ports))}
    checked = out = 0
    reasons: Counter = Counter()
    for sample in run.samples:
        for view in sample.nodes or []:
            if view["port"] not in ports:
                continue
            i = ports.index(view["port"])
            if any(start <= sample.t <= end for start, end in windows[i]):
                continue
            checked += 1
            if view["status"] != "active":
                out += 1
                reasons[re.sub(r"\d+(\.\d+)?", "N", view["reason"].split(":")[0])] += 1
    return {"node_samples": checked, "out": out, "reasons": dict(reasons.most_common(5))}


def verdict(run: Run, mem: dict, after: dict, args: argparse.Namespace,
            attacked: hostile.Results | None = None) -> list[str]:
    """Why the run failed; empty when it passed."""
    failures = [] if attacked is None else attacked.failures()
    if run.total(LOST):
        failures.append(f"{run.total(LOST)} requests lost")
    if mem["growth_mb"] > args.max_growth_mb:
        failures.append(f"RSS grew {mem['growth_mb']:.1f} MB after the warm-up "
                        f"(limit {args.max_growth_mb:g})")
    slope = mem["slope_mb_per_min"]
    if slope is not None and mem["slope_window_s"] >= SLOPE_MIN_WINDOW \
            and slope > args.max_slope:
        failures.append(f"RSS rose {slope:.2f} MB/min over the second half "
                        f"(limit {args.max_slope:g})")
    if after["in_flight"] != 0:
        failures.append(f"in-flight requests after the traffic: {after['in_flight']}")
    if after["queue_depth"] != 0:
        failures.append(f"queue depth after the traffic: {after['queue_depth']}")
    if not after["proxy_alive"]:
        failures.append("the proxy process died")
    if not run.total():
        failures.append("no request was sent")
    return failures


# ---------------------------------------------------------------- the proxy's log


LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (\w+) ")


def read_log(path: Path) -> list[tuple[float | None, str]]:
    out: list[tuple[float | None, str]] = []
    if not path.exists():
        return out
    for line in path.read_text(errors="replace").splitlines():
        match = LOG_LINE.match(line)
        moment = None
        if match:
            moment = datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f"
                                                ).timestamp()
        out.append((moment, line))
    return out


def log_levels(lines: list[tuple[float | None, str]]) -> dict[str, int]:
    levels: Counter = Counter()
    for _, line in lines:
        match = LOG_LINE.match(line)
        if match:
            levels[match.group(2)] += 1
        elif line.startswith("Traceback"):
            levels["Traceback"] += 1
    return dict(levels)


def attach_log(run: Run, lines: list[tuple[float | None, str]]) -> None:
    """The proxy's log lines (warnings and up, failovers) around each lost request."""
    for lost in run.lost:
        start = run.began_wall + lost["sent_s"] - 0.5
        end = run.began_wall + lost["ended_s"] + 0.5
        near = [line[:300] for moment, line in lines
                if moment is not None and start <= moment <= end
                and (" INFO " not in line or "failing over" in line)]
        lost["proxy_log"] = near[:12]


# ---------------------------------------------------------------- report


def markdown(run: Run, mem: dict, after: dict, failures: list[str], info: dict,
             attacked: hostile.Results | None = None,
             hostile_plan: hostile.Plan | None = None) -> str:
    minutes = after["traffic_s"] / 60
    parts = [f"## Soak: {minutes:.1f} min of mixed traffic through Aivonx with faults", "",
             f"Command: `{info['command']}`", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in info["machine"].items()), "",
             f"Setup: {NODES} fake nodes ({CHUNKS} chunks × {CHUNK_DELAY * 1000:g} ms, "
             f"`llama3` and `nomic-embed-text`), {info['slots']} slots a node, "
             f"`--health-interval 1`; {info['workers']} workers; memory baseline after "
             f"{mem['warmup_s']:g} s.", ""]
    parts += ["### Requests", "",
              "| kind | total | " + " | ".join(OUTCOMES) + " |",
              "|---|---:|" + "---:|" * len(OUTCOMES)]
    for kind in KINDS:
        counts = run.counts.get(kind.name, Counter())
        parts.append(f"| {kind.name} | {sum(counts.values()):,} | "
                     + " | ".join(f"{counts[o]:,}" for o in OUTCOMES) + " |")
    parts.append(f"| **all** | **{run.total():,}** | "
                 + " | ".join(f"**{run.total(o):,}**" for o in OUTCOMES) + " |")
    parts += ["", f"Lost: **{run.total(LOST)}**. Requests/s: "
                  f"{run.total() / max(after['traffic_s'], 1e-9):.1f}. "
                  f"`/api/tags` answers lacking a model: {run.incomplete_tags}."]
    if run.refusals:
        parts.append("Refusals: " + "; ".join(f"{n} × `{why}`"
                                              for why, n in run.refusals.most_common(5)) + ".")
    faults = Counter(f.kind for f in run.faults)
    parts += ["", "### Faults", "",
              "| fault | count |", "|---|---:|",
              f"| kill (SIGKILL, restart on the same port after a pause) | {faults['kill']} |",
              f"| hang (SIGSTOP, then SIGCONT) | {faults['hang']} |",
              f"| slow (restart with {SLOW_CHUNK_DELAY * 1000:g} ms a chunk, "
              f"later restart normal) | {faults['slow']} |",
              f"| flap (kill and restart several times quickly) | {faults['flap']} |",
              f"| skipped (no other node serving) | {faults['skipped']} |",
              f"| **total faults** | **{sum(faults.values()) - faults['skipped']}** |",
              "", "Signals and restarts: " + ", ".join(
                  f"{name} {run.actions[name]}" for name in ("SIGKILL", "SIGSTOP", "SIGCONT",
                                                             "restart")) + "."]
    slope = mem["slope_mb_per_min"]
    judged = mem["slope_window_s"] >= SLOPE_MIN_WINDOW
    parts += ["", "### Aivonx memory (VmRSS)", "",
              "| after warm-up | min | max | last | growth | slope, 2nd half | after traffic |",
              "|---:|---:|---:|---:|---:|---:|---:|",
              f"| {mem['start_mb']:.1f} MB | {mem['min_mb']:.1f} MB | {mem['max_mb']:.1f} MB "
              f"| {mem['last_mb']:.1f} MB | {mem['growth_mb']:+.1f} MB | "
              + ("—" if slope is None else f"{slope:+.2f} MB/min"
                 + ("" if judged else " (too short to judge)"))
              + f" | {_mb(after['rss_mb'])} |", "",
              f"{mem['samples']} samples; peak including the warm-up "
              f"{mem['peak_mb']:.1f} MB"
              + (f"; {mem['samples_near_big_bodies']} samples taken near a big body left "
                 f"out (see below)." if mem.get("samples_near_big_bodies") else ".")]
    if attacked is not None and hostile_plan is not None:
        parts += hostile.markdown(attacked, hostile_plan)
    failure_kinds = {}
    for labels, value in after["metrics"].get("aivonx_request_failures_total", {}).items():
        kind = re.search(r'kind="([^"]*)"', labels)
        key = kind.group(1) if kind else "?"
        failure_kinds[key] = failure_kinds.get(key, 0) + int(value)
    rejected = int(sum(after["metrics"].get("aivonx_rejected_total", {}).values()))
    peak_depth = max((s.queue_depth or 0 for s in run.samples), default=0)
    fewest = min((s.active_nodes for s in run.samples if s.active_nodes is not None),
                 default=None)
    busy = [s for s in run.samples if s.active_nodes is not None]
    single = sum(s.active_nodes <= 1 for s in busy)
    rotation = info["rotation"]
    parts += ["", "### After the traffic stopped", "",
              f"- in flight: {_n(after['in_flight'])}, queue depth: "
              f"{_n(after['queue_depth'])} (after {after['settle_s']:.1f} s); "
              f"proxy {'running' if after['proxy_alive'] else '**dead**'}",
              f"- the proxy's own counts: upstream failures by kind "
              f"{json.dumps(failure_kinds, sort_keys=True)}, rejected {rejected}; "
              f"deepest queue seen {_n(peak_depth)}; fewest nodes serving in a sample "
              f"{_n(fewest)}",
              f"- samples with at most one node serving: {single} of {len(busy)}; a node "
              f"running normally (no fault under way, {REJOIN_GRACE:g} s after the last) but "
              f"not routed to: {rotation['out']} of {rotation['node_samples']} node samples"
              + ("" if not rotation["reasons"] else ", the proxy's reasons: " + "; ".join(
                  f"{n} × `{why}`" for why, n in rotation["reasons"].items())),
              f"- proxy log lines by level: {json.dumps(info['log_levels'], sort_keys=True)}"]
    if run.lost:
        parts += ["", f"### Lost requests (first {len(run.lost)})", ""]
        for lost in run.lost:
            parts.append(f"- {lost['sent_at']} (+{lost['sent_s']:.1f}–{lost['ended_s']:.1f} s) "
                         f"{lost['kind']}, HTTP {lost['status']}, node "
                         f"{lost['node'] or '—'}: {lost['detail']}; faults: "
                         f"{', '.join(lost['faults']) or 'none'}")
            parts += [f"    - `{line}`" for line in lost.get("proxy_log", [])]
    parts += ["", "### Verdict", "",
              "**PASS**: nothing lost, memory flat, nothing left in flight"
              + (", hostile clients handled as expected." if hostile_plan is not None and (
                  hostile_plan.slow_clients or hostile_plan.login_every
                  or hostile_plan.big_every) else ".") if not failures
              else "**FAIL**: " + "; ".join(failures) + "."]
    return "\n".join(parts)


def _mb(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f} MB"


def _n(value: float | None) -> str:
    return "—" if value is None else f"{value:g}"


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0,
                        help="how long the traffic runs (default 10; 0.5 for a quick run)")
    parser.add_argument("--workers", type=int, default=WORKERS,
                        help=f"concurrent clients (default {WORKERS})")
    parser.add_argument("--slots", type=int, default=SLOTS,
                        help=f"Aivonx's slots a node (default {SLOTS})")
    parser.add_argument("--seed", type=int, default=1, help="of the traffic mix")
    parser.add_argument("--max-growth-mb", type=float, default=MAX_GROWTH_MB,
                        help=f"RSS growth after the warm-up that fails the run "
                             f"(default {MAX_GROWTH_MB:g})")
    parser.add_argument("--max-slope", type=float, default=MAX_SLOPE_MB_PER_MIN,
                        help="RSS slope over the second half, MB/min, that fails the run "
                             f"(default {MAX_SLOPE_MB_PER_MIN:g}; judged from 2 minutes on)")
    parser.add_argument("--no-hostile", action="store_true",
                        help="no hostile clients at all (the three flags below together)")
    parser.add_argument("--no-slow-bodies", action="store_true",
                        help="no clients that stall or trickle their request bodies")
    parser.add_argument("--no-login-bursts", action="store_true",
                        help="no bursts of wrong-password logins")
    parser.add_argument("--no-big-bodies", action="store_true",
                        help="no big request bodies")
    parser.add_argument("--slow-clients", type=int, default=SLOW_CLIENTS,
                        help=f"slow-body clients at a time (default {SLOW_CLIENTS}; at most 10 "
                             f"in runs under a minute)")
    parser.add_argument("--body-timeout", type=float, default=BODY_TIMEOUT,
                        help=f"the proxy's --body-timeout (default {BODY_TIMEOUT:g} s)")
    parser.add_argument("--big-body-mb", type=float, default=BIG_BODY_MB,
                        help=f"size of the big bodies (default {BIG_BODY_MB:g})")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    parser.add_argument("--keep", action="store_true",
                        help="keep the logs' directory (always kept when the run fails)")
    args = parser.parse_args(argv)
    if not 0 < args.minutes <= 24 * 60:
        parser.error("--minutes must be above 0 and at most a day")
    if args.workers < 1 or args.slots < 1:
        parser.error("--workers and --slots must be at least 1")
    if args.slow_clients < 0 or not 0 < args.body_timeout <= 60 or not 0 < args.big_body_mb <= 512:
        parser.error("--slow-clients must be at least 0, --body-timeout within (0, 60] and "
                     "--big-body-mb within (0, 512]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    raise_nofile_limit()
    duration = args.minutes * 60
    warmup = min(WARMUP, duration / 4)
    workdir = Path(tempfile.mkdtemp(prefix="aivonx-soak-"))
    children = Children()
    load_at_start = os.getloadavg()[0]
    nodes: Nodes | None = None
    failures = ["did not finish"]
    try:
        node_ports, node_procs = start_nodes(children, workdir, Nodes.args(False), NODES)
        proxy_port, launch = prepare_aivonx(
            children, workdir, node_ports, args.slots,
            ("--health-interval", "1", "--log-level", "info",
             "--body-timeout", f"{args.body_timeout:g}"))
        proxy = launch()
        say(f"nodes on ports {node_ports}, aivonx on {proxy_port} (pid {proxy.pid}); "
            f"logs in {workdir}")

        def nodes_of(run: Run) -> Nodes:
            nonlocal nodes
            nodes = Nodes(children, workdir, node_ports, node_procs, run)
            return nodes

        hostile_plan = hostile.Plan.for_duration(
            duration, slow=not (args.no_hostile or args.no_slow_bodies),
            logins=not (args.no_hostile or args.no_login_bursts),
            big=not (args.no_hostile or args.no_big_bodies), slow_clients=args.slow_clients,
            body_timeout=args.body_timeout, big_mb=args.big_body_mb)
        run, after, attacked = asyncio.run(soak(duration, args.workers, args.seed, nodes_of,
                                                proxy, proxy_port, hostile_plan))
        mem = memory(run.samples, duration, warmup, attacked.big_windows)
        failures = verdict(run, mem, after, args, attacked)
        lines = read_log(workdir / "aivonx.log")
        attach_log(run, lines)
        command = "python benchmarks/soak.py " + " ".join(
            sys.argv[1:] if argv is None else argv)
        machine = machine_info(None, load_at_start)
        machine.pop("nginx", None)
        info = {"command": command.strip(), "machine": machine, "slots": args.slots,
                "workers": args.workers, "log_levels": log_levels(lines),
                "rotation": out_of_rotation(run, node_ports)}
        print(markdown(run, mem, after, failures, info, attacked, hostile_plan))
        if args.json:
            Path(args.json).write_text(json.dumps({
                **info, "minutes": args.minutes, "failures": failures, "memory": mem,
                "after": after, "requests": {k: dict(c) for k, c in run.counts.items()},
                "totals": {o: run.total(o) for o in OUTCOMES}, "refusals": dict(run.refusals),
                "incomplete_tags": run.incomplete_tags, "lost": run.lost,
                "faults": [vars(f) for f in run.faults], "actions": dict(run.actions),
                "hostile": {"plan": vars(hostile_plan),
                            "slow_bodies": {k: dict(c) for k, c in attacked.slow.items()},
                            "slow_notes": dict(attacked.slow_notes),
                            "slow_peak": attacked.slow_peak, "logins": dict(attacked.logins),
                            "bursts": attacked.bursts, "big_bodies": attacked.big},
                "samples": [vars(s) for s in run.samples]}, indent=2))
    finally:
        if nodes is not None:
            nodes.resume_all()
        children.stop_all()
        if failures or args.keep:
            say(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the children were stopped on the way out
        sys.exit(130)
