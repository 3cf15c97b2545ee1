"""Aivonx as a separate process, the way an admin starts it: its log is
read line by line so tests can wait for what it says."""
from __future__ import annotations

import asyncio
import os
import re
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_PY = (sys.executable, os.path.join(ROOT, "run.py"))


class AivonxProcess:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.url = ""
        self._new_line = asyncio.Event()
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line.decode(errors="replace"))
            self._new_line.set()
        self._new_line.set()

    async def wait_for(self, pattern: str, timeout: float = 20, start: int = 0) -> re.Match:
        """The first log line from index `start` on matching `pattern`."""
        async def scan() -> re.Match:
            seen = start
            while True:
                for line in self.lines[seen:]:
                    match = re.search(pattern, line)
                    if match:
                        return match
                seen = max(seen, len(self.lines))
                if self._reader.done():
                    raise AssertionError(f"exited before logging {pattern!r}:\n" + self.output)
                self._new_line.clear()
                await self._new_line.wait()
        return await asyncio.wait_for(scan(), timeout)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    async def stop(self) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(self.proc.wait(), 20)
        await self._reader
        return code


async def start_aivonx(*args: str, command: tuple[str, ...] = RUN_PY, env: dict | None = None,
                       cwd: str = ROOT) -> AivonxProcess:
    """Start Aivonx on a free port and wait until it listens."""
    proc = await asyncio.create_subprocess_exec(
        *command, "--port", "0", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=cwd)
    process = AivonxProcess(proc)
    try:
        process.url = (await process.wait_for(r"listening on (http://\S+)")).group(1)
    except BaseException:
        await process.stop()
        raise
    return process


async def run_to_end(*args: str, command: tuple[str, ...] = RUN_PY, env: dict | None = None,
                     cwd: str = ROOT, timeout: float = 30) -> tuple[int, str]:
    """Run a command that exits by itself: (exit code, stdout and stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *command, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, **(env or {})}, cwd=cwd)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, out.decode(errors="replace")
