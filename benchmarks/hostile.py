"""Hostile clients for the soak (benchmarks/soak.py): they run next to its normal traffic and
node faults, and each of their outcomes is classified.

- slow bodies: connections that send a request head and then stall or trickle their body,
  a bounded number at a time; the proxy must close each once `--body-timeout` passed without
  a body byte, and answer nothing.
- login bursts: concurrent wrong-password logins for one username from one address; at most
  5 may get 401 (the throttle's limit), the rest 429 with Retry-After, and root's correct
  login right after must still succeed.
- big bodies: a request with a body of tens of MB (a long embedding input, a base64 image),
  one at a time; it must get a normal answer, and the proxy's resident memory is followed
  around it: the peak above what it held just before, and how soon it came back.
"""
from __future__ import annotations

import asyncio
import json
import re
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bench import HOST, Connection, Reply, build_request

CONNECT_TIMEOUT = 10.0
LOGIN_TIMEOUT = 60.0  # 30 password hashes queue for the proxy's executor on 2 shared cores
MAX_LOGIN_FAILURES = 5  # Aivonx's limit per username and address
BIG_TIMEOUT = 60.0
BIG_POLL = 0.02  # seconds between two RSS reads while a big body is under way
BIG_BACK_TIMEOUT = 10.0  # how long RSS may take to come back after a big body's answer
BIG_BACK_MARGIN = 0.1  # back means within this share of the body (at least 5 MB) of before
TRICKLES = 3  # body bytes a trickling client sends, half a body timeout apart, before it stops
SLOW_BODY_LENGTH = 4096  # the Content-Length a slow client declares (never sent in full)

# slow-body outcomes
CLOSED_ON_TIME = "closed by the proxy after --body-timeout"
CLOSED_EARLY = "closed before --body-timeout"
ANSWERED = "answered"
NOT_CLOSED = "still open long after --body-timeout"
NO_CONNECTION = "could not connect"
SLOW_OUTCOMES = (CLOSED_ON_TIME, CLOSED_EARLY, ANSWERED, NOT_CLOSED, NO_CONNECTION)
SLOW_MODES = ("head only", "stalled after a few bytes", f"trickled {TRICKLES} bytes, then stalled")
SLOW_PATHS = ("/api/generate", "/v1/chat/completions", "/api/account/login")

# login outcomes
WRONG = "401 (wrong password)"
THROTTLED = "429 with Retry-After"
UNEXPECTED = "anything else"
ROOT_IN = "root logged in (200)"
ROOT_REFUSED = "root refused"

Check = Callable[[Reply], tuple[str, str]]  # outcome, detail (the soak's classification)


@dataclass(frozen=True)
class BigKind:
    name: str
    raw: bytes  # the whole request
    check: Check


@dataclass
class Plan:
    """What runs and when, in seconds since the traffic began."""

    duration: float
    slow_clients: int  # at once; 0: none
    body_timeout: float  # the proxy's --body-timeout
    login_every: float  # 0: no bursts
    login_burst: int
    big_every: float  # 0: no big bodies
    big_bytes: int
    first: float

    @classmethod
    def for_duration(cls, duration: float, *, slow: bool, logins: bool, big: bool,
                     slow_clients: int, body_timeout: float, big_mb: float) -> "Plan":
        """Runs under a minute get fewer slow clients; every kind starts within the warm-up,
        so that the memory baseline already holds what they cost in steady state."""
        short = duration < 60
        return cls(duration=duration,
                   slow_clients=(min(slow_clients, 10) if short else slow_clients) if slow else 0,
                   body_timeout=body_timeout, login_every=20.0 if logins else 0.0,
                   login_burst=30, big_every=15.0 if big else 0.0,
                   big_bytes=int(big_mb * 1024 * 1024), first=min(6.0, 0.15 * duration))

    @property
    def slow_lifetime(self) -> float:
        """The longest a slow client should live: its trickle, then one body timeout."""
        return TRICKLES * self.body_timeout / 2 + self.body_timeout

    @property
    def slow_deadline(self) -> float:
        """How long after its last byte a slow client waits for the proxy to close it."""
        return self.body_timeout + max(10.0, 2 * self.body_timeout)


@dataclass
class Results:
    slow: dict[str, Counter] = field(default_factory=dict)  # mode -> outcome -> count
    slow_notes: Counter = field(default_factory=Counter)  # what the unexpected ones saw
    slow_peak: int = 0  # most slow clients open at once
    logins: Counter = field(default_factory=Counter)
    bursts: list[dict] = field(default_factory=list)
    big: list[dict] = field(default_factory=list)
    big_windows: list[tuple[float, float]] = field(default_factory=list)

    def failures(self) -> list[str]:
        """What the proxy did wrong with the hostile clients; empty when nothing."""
        out = []
        bad = sum(c[o] for c in self.slow.values() for o in SLOW_OUTCOMES if o != CLOSED_ON_TIME)
        if bad:
            out.append(f"{bad} slow-body clients not closed as expected")
        through = [b for b in self.bursts if b["wrong"] > MAX_LOGIN_FAILURES]
        if through:
            out.append(f"{len(through)} login bursts let more than {MAX_LOGIN_FAILURES} "
                       f"guesses through")
        if self.logins[UNEXPECTED]:
            out.append(f"{self.logins[UNEXPECTED]} burst logins answered neither 401 nor 429")
        if self.logins[ROOT_REFUSED]:
            out.append(f"root's login refused after {self.logins[ROOT_REFUSED]} bursts")
        lost = [b for b in self.big if b["outcome"] == "lost"]
        if lost:
            out.append(f"{len(lost)} big bodies lost")
        return out


def vm_mb(pid: int, name: str = "VmRSS") -> float | None:
    """One figure of /proc/<pid>/status in MB (this process only: quick enough to poll)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{name}:\s+(\d+) kB", status, re.M)
    return int(match.group(1)) / 1024 if match else None


def reset_peak(pid: int) -> bool:
    """Reset the process's VmHWM (Linux 4.0+), so that it holds the peak from now on."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class Hostile:
    """The hostile clients of one soak run, against the proxy on `port` (process `pid`)."""

    def __init__(self, plan: Plan, port: int, pid: int, root_password: str,
                 big_kinds: list[BigKind], clock: Callable[[], float],
                 stop: asyncio.Event) -> None:
        self.plan, self.port, self.pid = plan, port, pid
        self.root_password = root_password
        self.big_kinds = big_kinds
        self.clock, self.stop = clock, stop
        self.results = Results()
        self._slow_open = 0
        # A login burst's password hashes take memory too: one of the two at a time, so
        # that a big body's figures are its own.
        self._heavy = asyncio.Lock()

    def tasks(self) -> list[asyncio.Future]:
        plan = self.plan
        tasks = [asyncio.ensure_future(self._slow_loop(i)) for i in range(plan.slow_clients)]
        if plan.login_every:
            tasks.append(asyncio.ensure_future(self._login_loop()))
        if plan.big_every and self.big_kinds:
            tasks.append(asyncio.ensure_future(self._big_loop()))
        return tasks

    async def _until(self, moment: float) -> bool:
        """Sleep until `moment` (run time); False if the run stopped first."""
        try:
            await asyncio.wait_for(self.stop.wait(), max(0.0, moment - self.clock()))
        except asyncio.TimeoutError:
            pass
        return not self.stop.is_set()

    # ------------------------------------------------------------ slow bodies

    async def _slow_loop(self, index: int) -> None:
        """One slot of slow clients, each opened when the last one ended; the last one is
        opened early enough to be closed by the proxy before the traffic stops."""
        plan = self.plan
        last_start = plan.duration - plan.slow_lifetime - 2
        if not await self._until(plan.first + index * plan.body_timeout / plan.slow_clients):
            return
        number = index
        while self.clock() < last_start and not self.stop.is_set():
            mode = SLOW_MODES[number % len(SLOW_MODES)]
            path = SLOW_PATHS[(number // len(SLOW_MODES)) % len(SLOW_PATHS)]
            outcome, note = await self._slow_client(mode, path)
            self.results.slow.setdefault(mode, Counter())[outcome] += 1
            if outcome != CLOSED_ON_TIME:
                self.results.slow_notes[f"{outcome}: {note}"[:120]] += 1
            number += len(SLOW_MODES) * plan.slow_clients + 1

    async def _slow_client(self, mode: str, path: str) -> tuple[str, str]:
        plan = self.plan
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, self.port),
                                                    CONNECT_TIMEOUT)
        except (OSError, asyncio.TimeoutError) as exc:
            return NO_CONNECTION, repr(exc)
        self._slow_open += 1
        self.results.slow_peak = max(self.results.slow_peak, self._slow_open)
        last = self.clock()
        body = b'{"model": "llama3", "username": "x", "prompt": "' + b"a" * SLOW_BODY_LENGTH
        head = (f"POST {path} HTTP/1.1\r\nHost: {HOST}:{self.port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {SLOW_BODY_LENGTH}\r\n\r\n"
                ).encode()
        try:
            sent = 0 if mode == SLOW_MODES[0] else 20
            writer.write(head + body[:sent])
            last = self.clock()
            if mode == SLOW_MODES[2]:
                for _ in range(TRICKLES):
                    try:
                        data = await asyncio.wait_for(reader.read(65536), plan.body_timeout / 2)
                    except asyncio.TimeoutError:
                        writer.write(body[sent:sent + 1])
                        sent += 1
                        last = self.clock()
                        continue
                    return self._ended(data, last, "while trickling")
            try:
                data = await asyncio.wait_for(reader.read(65536), plan.slow_deadline)
            except asyncio.TimeoutError:
                return NOT_CLOSED, f"{mode}, {path}"
            return self._ended(data, last, f"{mode}, {path}")
        except (ConnectionError, OSError) as exc:  # a reset is a close too
            return self._ended(b"", last, repr(exc))
        finally:
            self._slow_open -= 1
            writer.close()

    def _ended(self, data: bytes, last_byte: float, where: str) -> tuple[str, str]:
        if data:
            first = data.split(b"\r\n", 1)[0].decode("latin-1")[:60]
            return ANSWERED, f"{first} ({where})"
        idle = self.clock() - last_byte
        if idle < 0.95 * self.plan.body_timeout:
            return CLOSED_EARLY, f"{idle:.2f} s after the last byte ({where})"
        return CLOSED_ON_TIME, ""

    # ------------------------------------------------------------ login bursts

    async def _login(self, username: str, password: str) -> Reply | None:
        raw = build_request(self.port, "/api/account/login",
                            {"username": username, "password": password})
        try:
            conn = await asyncio.wait_for(Connection.open(self.port), CONNECT_TIMEOUT)
        except (OSError, asyncio.TimeoutError):
            return None
        try:
            return await conn.fetch(raw, LOGIN_TIMEOUT)
        finally:
            conn.close()

    async def _login_loop(self) -> None:
        plan = self.plan
        moment = plan.first
        for number in range(10_000):
            if moment > plan.duration - 3 or not await self._until(moment):
                return
            async with self._heavy:
                await self._burst(number)
            moment = max(moment + plan.login_every, self.clock())

    async def _burst(self, number: int) -> None:
        """`login_burst` wrong passwords at once for a username of its own (so each burst
        meets the per-username limit afresh), then root's right one."""
        username = f"guesser{number}"
        started = self.clock()
        rss_before = self._rss()
        replies = await asyncio.gather(*(self._login(username, f"wrong-password-{i}")
                                         for i in range(self.plan.login_burst)))
        counts = Counter()
        for reply in replies:
            if reply is not None and reply.status == 401 and not reply.error:
                counts[WRONG] += 1
            elif reply is not None and reply.status == 429 and "retry-after" in reply.headers:
                counts[THROTTLED] += 1
            else:
                counts[UNEXPECTED] += 1
        rss_burst = self._rss()
        root = await self._login("root", self.root_password)
        root_ok = root is not None and root.ok and b'"access"' in root.body
        counts[ROOT_IN if root_ok else ROOT_REFUSED] += 1
        self.results.logins.update(counts)
        self.results.bursts.append({
            "t": round(started, 2), "username": username, "wrong": counts[WRONG],
            "throttled": counts[THROTTLED], "unexpected": counts[UNEXPECTED],
            "root_ok": root_ok, "root_status": root.status if root else 0,
            "rss_before_mb": round(rss_before, 1), "rss_after_mb": round(rss_burst, 1),
            "seconds": round(self.clock() - started, 2)})

    # ------------------------------------------------------------ big bodies

    async def _big_loop(self) -> None:
        plan = self.plan
        moment = plan.first + 0.5  # after the first login burst
        for number in range(10_000):
            # started only with room for the answer and for memory to come back in the run
            if moment > plan.duration - BIG_BACK_TIMEOUT or not await self._until(moment):
                return
            async with self._heavy:
                await self._big(self.big_kinds[number % len(self.big_kinds)])
            moment = max(moment + plan.big_every, self.clock())

    def _rss(self) -> float:
        return vm_mb(self.pid) or 0.0

    async def _big(self, kind: BigKind) -> None:
        body_mb = self.plan.big_bytes / 2 ** 20
        started = self.clock()
        self.results.big_windows.append((started, started))
        try:
            before_reads = []
            for _ in range(3):
                before_reads.append(self._rss())
                await asyncio.sleep(0.05)
            before = statistics.median(before_reads)
            hwm = reset_peak(self.pid)
            peak = before
            sent = self.clock()
            reply: Reply | None = None
            try:
                conn = await asyncio.wait_for(Connection.open(self.port), CONNECT_TIMEOUT)
            except (OSError, asyncio.TimeoutError) as exc:
                outcome, detail = "lost", f"cannot connect: {exc!r}"
            else:
                reply = conn.send(kind.raw)
                deadline = time.monotonic() + BIG_TIMEOUT
                while not reply.done.done() and time.monotonic() < deadline:
                    peak = max(peak, self._rss())
                    await asyncio.sleep(BIG_POLL)
                if not reply.done.done():
                    reply.settle("timeout")
                conn.close()
                outcome, detail = kind.check(reply)
            answered = self.clock() - sent
            peak = max(peak, self._rss(), (vm_mb(self.pid, "VmHWM") or 0.0) if hwm else 0.0)
            margin = max(5.0, BIG_BACK_MARGIN * body_mb)
            back_s = None
            after = self._rss()
            back_by = time.monotonic() + BIG_BACK_TIMEOUT
            while time.monotonic() < back_by:
                after = self._rss()
                if after <= before + margin:
                    back_s = self.clock() - sent - answered
                    break
                await asyncio.sleep(0.1)
            self.results.big.append({
                "kind": kind.name, "t": round(started, 2), "outcome": outcome,
                "detail": detail[:200], "status": reply.status if reply else 0,
                "answer_s": round(answered, 2), "before_mb": round(before, 1),
                "peak_mb": round(peak, 1), "above_mb": round(peak - before, 1),
                "times_body": round((peak - before) / body_mb, 2),
                "after_mb": round(after, 1), "back_s": None if back_s is None
                else round(back_s, 2), "peak_from_hwm": hwm})
        finally:
            self.results.big_windows[-1] = (started, self.clock())


def big_request(port: int, path: str, head: dict, field_name: str, size: int,
                in_list: bool = False) -> bytes:
    """A POST whose JSON body is `head` plus one string field (or a one-string list) of
    base64-looking characters, `size` bytes in all."""
    prefix = json.dumps(head)[:-1].encode() + f', "{field_name}": '.encode() \
        + (b'["' if in_list else b'"')
    suffix = b'"]}' if in_list else b'"}'
    filler = max(0, size - len(prefix) - len(suffix))
    unit = b"iVBORw0KGgoAAAANSUhEUgAA"  # how a base64 PNG begins
    payload = prefix + (unit * (filler // len(unit) + 1))[:filler] + suffix
    return (f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
            ).encode() + payload


# ---------------------------------------------------------------- report


def markdown(results: Results, plan: Plan) -> list[str]:
    """The hostile clients' section of the summary."""
    parts = ["", "### Hostile clients", ""]
    rows = ["| hostile client | outcome | count | counts as |", "|---|---|---:|---|"]
    if plan.slow_clients:
        for mode in SLOW_MODES:
            counts = results.slow.get(mode, Counter())
            for outcome in SLOW_OUTCOMES:
                if counts[outcome] or outcome == CLOSED_ON_TIME:
                    rows.append(f"| slow body, {mode} | {outcome} | {counts[outcome]:,} | "
                                + ("expected" if outcome == CLOSED_ON_TIME
                                   else "**unexpected**") + " |")
    if plan.login_every:
        for outcome, note in ((WRONG, f"expected, at most {MAX_LOGIN_FAILURES} a burst"),
                              (THROTTLED, "expected"), (UNEXPECTED, "**unexpected**"),
                              (ROOT_IN, "expected, after each burst"),
                              (ROOT_REFUSED, "**unexpected**")):
            if results.logins[outcome] or outcome in (WRONG, THROTTLED, ROOT_IN):
                rows.append(f"| login burst, {plan.login_burst} at once | {outcome} | "
                            f"{results.logins[outcome]:,} | {note} |")
    if plan.big_every:
        outcomes = Counter((b["kind"], b["outcome"]) for b in results.big)
        for (kind, outcome), n in sorted(outcomes.items()):
            rows.append(f"| {kind} | {outcome} | {n} | "
                        + ("**lost**" if outcome == "lost" else "expected") + " |")
    if len(rows) == 2:
        return parts + ["None (`--no-hostile`)."]
    parts += rows
    notes = []
    if plan.slow_clients:
        notes.append(f"Slow bodies: {plan.slow_clients} clients at a time (at most "
                     f"{results.slow_peak} open at once), on {', '.join(SLOW_PATHS)}, "
                     f"against `--body-timeout {plan.body_timeout:g}`.")
        if results.slow_notes:
            notes.append("Unexpected: " + "; ".join(f"{n} × `{what}`" for what, n
                                                    in results.slow_notes.most_common(5)) + ".")
    if results.bursts:
        wrong = [b["wrong"] for b in results.bursts]
        slowest = max(b["seconds"] for b in results.bursts)
        grew = max(b["rss_after_mb"] - b["rss_before_mb"] for b in results.bursts)
        notes.append(f"Login bursts: {len(results.bursts)}, each for a username of its own "
                     f"from 127.0.0.1; 401s a burst {min(wrong)}–{max(wrong)} (limit "
                     f"{MAX_LOGIN_FAILURES}); a burst and root's login took {slowest:.1f} s "
                     f"at most; the proxy's RSS rose by {grew:+.1f} MB across a burst at "
                     f"most.")
    parts += ["", " ".join(notes)] if notes else []
    if results.big:
        body_mb = plan.big_bytes / 2 ** 20
        parts += ["", f"#### {body_mb:g} MB bodies: Aivonx memory (VmRSS) around each", "",
                  "| at | request | answer | in | before | peak | peak − before | ÷ body "
                  "| back within 10% of the body | after |",
                  "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for b in results.big:
            back = "**no**" if b["back_s"] is None else f"{b['back_s']:.1f} s"
            parts.append(f"| {b['t']:.0f} s | {b['kind']} | {b['outcome']} | "
                         f"{b['answer_s']:.1f} s | {b['before_mb']:.1f} MB | "
                         f"{b['peak_mb']:.1f} MB | {b['above_mb']:+.1f} MB | "
                         f"{b['times_body']:.2f} | {back} | {b['after_mb']:.1f} MB |")
        worst = max(b["times_body"] for b in results.big)
        parts += ["", f"Worst peak: {worst:.2f}× the body above what the proxy held just "
                      f"before (goal ≤ 2×); "
                      f"{sum(b['back_s'] is not None for b in results.big)} of "
                      f"{len(results.big)} came back within {BIG_BACK_TIMEOUT:g} s. Peaks are "
                      f"VmHWM (reset before each body) where the kernel allows, else polled "
                      f"every {BIG_POLL * 1000:g} ms; normal traffic runs meanwhile. The "
                      f"memory samples taken while a big body was under way or its memory "
                      f"not back are left out of the flatness figures above."]
    return parts
