#!/usr/bin/env python3
"""What shared counting costs: Aivonx with --redis next to Aivonx without, and two
instances sharing one Redis next to one.

    python benchmarks/cluster_bench.py              # about a minute
    python benchmarks/cluster_bench.py --quick      # about half a minute

Everything is its own process on 127.0.0.1: two fast nodes (benchmarks/fastnode.py), a
private redis-server (free port, no persistence, its own directory), Aivonx instances
(run.py, each with its own SQLite file and the same nodes at 1,024 slots), and wrk
sending small `/api/generate` requests. Per configuration: requests/s, latency p50 and
what it adds over direct, Redis commands per request (the `INFO commandstats` delta over
the requests; a pipeline or script counts each command it runs) and the Aivonx process's
CPU per request (utime + stime from /proc/PID/stat over the requests). The Markdown
report goes to stdout, progress to stderr. See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import (GENERATE_SMALL, HOST, Children, _exit_on_sigterm, free_port,
                   machine_info, prepare_aivonx, raise_nofile_limit, start_nodes, wrk_small)

PATH = "/api/generate"
CONNECTIONS = 32
PAIR_CONNECTIONS = 16  # per instance when two share the load


def log(message: str) -> None:
    print(f"[cluster_bench] {message}", file=sys.stderr, flush=True)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Redis:
    """A redis-server of the benchmark's own: 127.0.0.1, a free port, a private directory,
    nothing written to disk."""

    def __init__(self, children: Children, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not installed (apt-get install redis-server)")
        self.port = free_port()
        root = workdir / "redis"
        root.mkdir()
        self.proc, _ = children.start("redis", [
            binary, "--port", str(self.port), "--bind", HOST, "--save", "", "--appendonly",
            "no", "--dir", str(root)], workdir)
        import redis
        self.client = redis.Redis(host=HOST, port=self.port)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def commands(self) -> int:
        """Commands the server has run so far, ours (INFO, PING) left out."""
        stats = self.client.info("commandstats")
        return sum(v["calls"] for k, v in stats.items()
                   if k not in ("cmdstat_info", "cmdstat_ping"))


async def measure(wrk: str, ports: list[int], pids: list[int], duration: float,
                  connections: int, redis: Redis | None) -> dict:
    """wrk against every port at once (`connections` each), summed; with the CPU the
    `pids` spent and the Redis commands run meanwhile, per request."""
    cpu_before = [cpu_seconds(pid) for pid in pids]
    commands_before = redis.commands() if redis else 0
    started = time.monotonic()
    runs = await asyncio.gather(*(wrk_small(wrk, [port], duration, PATH, GENERATE_SMALL,
                                            connections) for port in ports))
    elapsed = time.monotonic() - started
    cpu = sum(cpu_seconds(pid) - before for pid, before in zip(pids, cpu_before))
    rps = sum(run["rps"] for run in runs)
    requests = rps * round(duration)  # wrk's own duration, rounded to whole seconds
    out = {"rps": rps, "p50_ms": max(run["p50_ms"] for run in runs),
           "errors": sum(run["errors"] for run in runs),
           "cpu_us": cpu / requests * 1e6 if pids and requests else None,
           "commands": (redis.commands() - commands_before) / requests
           if redis and requests else None, "elapsed": elapsed}
    return out


def fmt(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 s a measurement, not 5")
    parser.add_argument("--duration", type=float, help="seconds a measurement")
    args = parser.parse_args(argv)
    duration = args.duration or (2.0 if args.quick else 5.0)
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    raise_nofile_limit()
    load_at_start = os.getloadavg()[0]
    workdir = Path(tempfile.mkdtemp(prefix="aivonx-cluster-bench-"))
    children = Children()
    rows: list[tuple[str, dict]] = []
    try:
        node_ports, _ = start_nodes(children, workdir, ["--chunks", "1"], fast=True)
        redis = Redis(children, workdir)
        plain_port, plain = prepare_aivonx(children, workdir, node_ports, name="plain")
        shared = [prepare_aivonx(children, workdir, node_ports, name=f"shared{i}",
                                 extra=("--redis", redis.url)) for i in range(2)]
        procs = {"plain": plain(), "shared0": shared[0][1]()}

        async def run() -> None:
            warm = [*node_ports, plain_port, shared[0][0]]
            await asyncio.gather(*(wrk_small(wrk, [p], 1, PATH, GENERATE_SMALL, 4)
                                   for p in warm))
            log("direct")
            rows.append(("direct (both nodes)", await measure(
                wrk, node_ports, [], duration, CONNECTIONS, None)))
            log("one instance, no Redis")
            rows.append(("1 instance, no Redis", await measure(
                wrk, [plain_port], [procs["plain"].pid], duration, CONNECTIONS, None)))
            log("one instance, --redis")
            rows.append(("1 instance, --redis", await measure(
                wrk, [shared[0][0]], [procs["shared0"].pid], duration, CONNECTIONS, redis)))

        asyncio.run(run())
        children.stop([procs.pop("plain")])  # its CPU must not mix into the pair's
        procs["shared1"] = shared[1][1]()

        async def pair() -> None:
            await wrk_small(wrk, [shared[1][0]], 1, PATH, GENERATE_SMALL, 4)
            log("two instances, one Redis")
            rows.append((f"2 instances, one Redis, {PAIR_CONNECTIONS} connections each", await
                         measure(wrk, [shared[0][0], shared[1][0]],
                                 [procs["shared0"].pid, procs["shared1"].pid], duration,
                                 PAIR_CONNECTIONS, redis)))

        asyncio.run(pair())
    finally:
        children.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    direct_p50 = rows[0][1]["p50_ms"]
    machine = machine_info(None, load_at_start)
    machine.pop("nginx", None)
    command = "python benchmarks/cluster_bench.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    lines = [f"Command: `{command.strip()}`", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()), "",
             f"#### Shared counting: small `{PATH}` (stream false), wrk, {duration:g} s each",
             "", "| configuration | requests/s | latency p50 (ms) | added p50 vs direct (ms) "
             "| Redis commands per request | Aivonx CPU per request (µs) | errors |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for label, row in rows:
        added = None if label.startswith("direct") else row["p50_ms"] - direct_p50
        lines.append(f"| {label} | {fmt(row['rps'], 0)} | {fmt(row['p50_ms'], 2)} | "
                     f"{fmt(added, 2)} | {fmt(row['commands'], 2)} | {fmt(row['cpu_us'], 0)} "
                     f"| {row['errors']} |")
    plain_cpu, shared_cpu = rows[1][1]["cpu_us"], rows[2][1]["cpu_us"]
    if plain_cpu and shared_cpu:
        lines += ["", f"--redis adds {shared_cpu - plain_cpu:,.0f} µs of Aivonx CPU per "
                      "request (the Redis server's own CPU not counted)."]
    lines += ["", f"2 instances vs 1 (with --redis): {rows[3][1]['rps'] / rows[2][1]['rps']:.2f}"
                  "× the requests/s. A 2-core box shared with the load generator, the nodes "
                  "and Redis cannot show the gain a bigger box would: there a second "
                  "instance takes the CPU the first one needs."]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
