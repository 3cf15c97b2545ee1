#!/usr/bin/env python3
"""Cache-aware routing against least_active and round_robin, on multi-tenant chat.

    python benchmarks/cache_bench.py                 # full: about 2 minutes
    python benchmarks/cache_bench.py --quick         # a small run, about 30 s

Each strategy gets its own Aivonx (run.py) in front of its own 4 fake nodes
(tests/fakes/fake_ollama.py with its prompt cache model, so one strategy's
traffic never warms another's caches), and all three serve the same schedule
at the same time: 64 conversations of 6 turns from 8 tenants, each tenant with
its own ~1,500-word system prompt. A conversation's user sends a turn, reads
the whole streamed answer, thinks, and sends the next turn with the whole
history, as a chat client does. The Markdown report goes to stdout, progress
to stderr. See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench import (HOST, Children, Connection, _exit_on_sigterm, admin_call, build_request,
                   machine_info, percentile, prepare_aivonx, raise_nofile_limit, start_nodes)

STRATEGIES = ("least_active", "round_robin", "cache_aware")
NODES = 4
SLOTS = 4                  # Aivonx's default, Ollama's own parallelism
CHUNKS = 20
CHUNK_DELAY = 0.02         # 50 tokens/s of generation
PER_TOKEN = 0.0005         # prefill: 2,000 tokens/s
BASE = 0.02
SYSTEM_WORDS = 1500
REQUEST_TIMEOUT = 120.0
AIVONX_ARGS = ("--health-interval", "2", "--log-level", "warning")
VOCABULARY = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
              "november oscar papa quebec romeo sierra tango uniform victor whiskey xray "
              "yankee zulu").split()


def log(message: str) -> None:
    print(f"[cache-bench] {message}", file=sys.stderr, flush=True)


@dataclass
class Workload:
    conversations: int = 64
    turns: int = 6
    tenants: int = 8
    window: float = 30.0       # conversations start spread over this many seconds
    think: tuple[float, float] = (2.0, 8.0)  # seconds between an answer and the next turn
    slots: int = SLOTS         # per node: its cache slots, and Aivonx's slots for it
    seed: int = 13


@dataclass
class Turn:
    ttfc: float | None
    node: str
    route: str
    ok: bool
    sent_at: float
    done_at: float
    conversation: int = 0
    turn: int = 0


@dataclass
class Outcome:
    turns: list[Turn] = field(default_factory=list)


def words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(VOCABULARY) for _ in range(count))


def plan(work: Workload) -> list[dict]:
    """Every conversation: its tenant, start time, user messages and think times."""
    rng = random.Random(work.seed)
    systems = [f"tenant {t}: " + words(rng, SYSTEM_WORDS) for t in range(work.tenants)]
    out = []
    for conv in range(work.conversations):
        out.append({
            "id": conv,
            "system": systems[conv % work.tenants],
            "start": rng.uniform(0, work.window),
            "users": [f"conversation {conv}: " + words(rng, rng.randint(30, 120))
                      for _ in range(work.turns)],
            "think": [rng.uniform(*work.think) for _ in range(work.turns)],
        })
    return out


def answer_text(body: bytes) -> str:
    text = []
    for line in body.split(b"\n"):
        if line.strip():
            text.append(json.loads(line).get("message", {}).get("content", ""))
    return "".join(text)


async def converse(port: int, conv: dict, t0: float, outcome: Outcome) -> None:
    await asyncio.sleep(max(0.0, t0 + conv["start"] - time.perf_counter()))
    messages = [{"role": "system", "content": conv["system"]}]
    for index, (user, think) in enumerate(zip(conv["users"], conv["think"])):
        messages.append({"role": "user", "content": user})
        raw = build_request(port, "/api/chat", {"model": "llama3", "messages": messages})
        conn = await Connection.open(port)
        try:
            reply = await conn.fetch(raw, REQUEST_TIMEOUT)
        finally:
            conn.close()
        ok = reply.ok and reply.body.rstrip().endswith(b"}") and b'"done":true' in reply.body
        outcome.turns.append(Turn(
            ttfc=reply.line_times[0] - reply.sent_at if reply.line_times else None,
            node=reply.headers.get("x-aivonx-node", ""),
            route=reply.headers.get("x-aivonx-route", ""), ok=ok,
            sent_at=reply.sent_at, done_at=reply.done_at, conversation=conv["id"],
            turn=index))
        if not ok:
            return
        messages.append({"role": "assistant", "content": answer_text(bytes(reply.body))})
        await asyncio.sleep(think)


def cache_stats(port: int) -> dict:
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        conn.request("GET", "/_fake/cache")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def load_model(port: int) -> None:
    """Load the model on a node (a generate without a prompt, as `ollama run` does), as
    every node of a cluster in service has it: the run measures caches, not first loads."""
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        conn.request("POST", "/api/generate", json.dumps({"model": "llama3", "keep_alive": -1}),
                     {"Content-Type": "application/json"})
        reply = conn.getresponse()
        if reply.status != 200:
            raise RuntimeError(f"loading llama3 on port {port}: {reply.status} {reply.read()!r}")
        reply.read()
    finally:
        conn.close()


def start_strategy(children: Children, workdir: Path, strategy: str, per_token: float,
                   load_factor: float | None = None, slots: int = SLOTS
                   ) -> tuple[int, list[int]]:
    """Four fake nodes with a prompt cache and an Aivonx routing by `strategy`."""
    node_args = ["--chunks", str(CHUNKS), "--chunk-delay", str(CHUNK_DELAY),
                 "--prefix-cache-per-token", str(per_token), "--prefix-cache-base", str(BASE),
                 "--prefix-cache-slots", str(slots)]
    ports, _ = start_nodes(children, workdir, node_args, count=NODES)
    for node_port in ports:
        load_model(node_port)
    port, launch = prepare_aivonx(children, workdir, ports, slots=slots, args=AIVONX_ARGS)
    launch()
    token = admin_call(port, "POST", "/api/account/login",
                       {"username": "root",
                        "password": os.environ["AIVONX_ROOT_PASSWORD"]})["access"]
    config = {"strategy": strategy}
    if load_factor is not None:
        config["cache_load_factor"] = load_factor
    admin_call(port, "PATCH", "/api/proxy/config", config, token)
    return port, ports


def summarise(outcome: Outcome, node_ports: list[int]) -> dict:
    turns = outcome.turns
    good = [t for t in turns if t.ok]
    ttfc = [t.ttfc for t in good if t.ttfc is not None]
    per_node = Counter(t.node for t in good)
    counts = list(per_node.values()) + [0] * (NODES - len(per_node))
    span = (max(t.done_at for t in good) - min(t.sent_at for t in good)) if good else 0.0
    stats = [cache_stats(p) for p in node_ports]
    return {
        "requests": len(turns), "failed": len(turns) - len(good),
        "ttfc_p50_ms": round(percentile(ttfc, 50) * 1000, 1) if ttfc else None,
        "ttfc_p90_ms": round(percentile(ttfc, 90) * 1000, 1) if ttfc else None,
        "ttfc_p99_ms": round(percentile(ttfc, 99) * 1000, 1) if ttfc else None,
        "tokens_prefilled": sum(s["tokens_prefilled"] for s in stats),
        "tokens_reused": sum(s["tokens_reused"] for s in stats),
        "requests_per_s": round(len(good) / span, 2) if span else None,
        "max_over_mean": round(max(counts) / (sum(counts) / NODES), 2) if good else None,
        "per_node": sorted(counts, reverse=True),
        "routes": dict(Counter(t.route for t in good)),
        "ttfc_p50_ms_by_route": {
            route: round(percentile([t.ttfc for t in good if t.route == route
                                     and t.ttfc is not None], 50) * 1000, 1)
            for route in sorted({t.route for t in good})},
    }


def report(results: dict[str, dict], work: Workload, machine: dict[str, str],
           command: str) -> str:
    base = results.get("least_active", {"ttfc_p90_ms": None})
    lines = [
        "## Cache-aware routing", "",
        f"`{command}` — {work.conversations} conversations × {work.turns} turns, "
        f"{work.tenants} tenants (system prompt {SYSTEM_WORDS} words), {NODES} nodes × "
        f"{work.slots} slots per strategy, prefill {PER_TOKEN * 1000:g} ms per uncached token "
        f"+ {BASE * 1000:g} ms, {CHUNKS} chunks {CHUNK_DELAY * 1000:g} ms apart, think time "
        f"{work.think[0]:g}–{work.think[1]:g} s. {machine.get('cpu', '')}, {machine.get('cores', '?')} cores, load {machine.get('load average (1 min) at start → end', '?')}.".strip(), "",
        "| strategy | TTFC p50 ms | TTFC p90 ms | TTFC p99 ms | p90 vs least_active | "
        "tokens prefilled | requests/s | max ÷ mean per node | requests per node | "
        "failed | routes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in results:
        r = results[name]
        gain = (f"{base['ttfc_p90_ms'] / r['ttfc_p90_ms']:.1f}×"
                if r["ttfc_p90_ms"] and base["ttfc_p90_ms"] else "—")
        routes = ", ".join(f"{k} {v}" for k, v in sorted(r["routes"].items()))
        lines.append(f"| {name} | {r['ttfc_p50_ms']} | {r['ttfc_p90_ms']} | {r['ttfc_p99_ms']} "
                     f"| {gain} | {r['tokens_prefilled']:,} | {r['requests_per_s']} | "
                     f"{r['max_over_mean']} | {' / '.join(map(str, r['per_node']))} | "
                     f"{r['failed']} | {routes} |")
    return "\n".join(lines)


async def run(ports: dict[str, int], work: Workload) -> dict[str, Outcome]:
    conversations = plan(work)
    outcomes = {name: Outcome() for name in ports}
    t0 = time.perf_counter() + 0.5
    tasks = [converse(ports[name], conv, t0, outcomes[name])
             for conv in conversations for name in ports]
    await asyncio.gather(*tasks)
    return outcomes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="16 conversations of 3 turns over 10 s")
    parser.add_argument("--conversations", type=int)
    parser.add_argument("--turns", type=int)
    parser.add_argument("--per-token", type=float, default=PER_TOKEN,
                        help="the nodes' prefill seconds per uncached prompt token")
    parser.add_argument("--load-factor", type=float,
                        help="cache_aware's cache_load_factor (default: Aivonx's, 1.25)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES),
                        help="which to run, comma-separated (least_active is the reference)")
    parser.add_argument("--slots", type=int, default=SLOTS,
                        help="per node: its prompt cache slots and Aivonx's slots for it")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--json", metavar="PATH", help="write the figures as JSON as well")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Workload(seed=args.seed)
    if args.quick:
        work.conversations, work.turns, work.window, work.think = 16, 3, 10.0, (1.0, 3.0)
    work.conversations = args.conversations or work.conversations
    work.turns = args.turns or work.turns
    work.slots = args.slots
    strategies = [s for s in STRATEGIES if s in args.strategies.split(",")]
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    raise_nofile_limit()
    workdir = Path(tempfile.mkdtemp(prefix="aivonx-cache-bench-"))
    children = Children()
    load_at_start = os.getloadavg()[0]
    try:
        proxies, nodes = {}, {}
        for name in strategies:
            sub = workdir / name
            sub.mkdir()
            proxies[name], nodes[name] = start_strategy(children, sub, name, args.per_token,
                                                        args.load_factor, work.slots)
            log(f"{name}: aivonx on {proxies[name]}, nodes {nodes[name]}")
        log(f"running {work.conversations} conversations x {work.turns} turns per strategy")
        outcomes = asyncio.run(run(proxies, work))
        results = {name: summarise(outcomes[name], nodes[name]) for name in strategies}
    finally:
        children.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    command = "python benchmarks/cache_bench.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    print(report(results, work, machine_info(None, load_at_start), command.strip()))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if os.environ.get("CACHE_BENCH_TRACE"):
        for name in strategies:
            for t in sorted(outcomes[name].turns, key=lambda t: t.sent_at):
                log(f"{name} c{t.conversation} t{t.turn} {t.node} {t.route} "
                    f"{t.ttfc and round(t.ttfc * 1000)} at {t.sent_at:.2f}")
    return 0 if all(r["failed"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
