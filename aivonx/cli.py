"""The `aivonx` command (also `python run.py`): serve the proxy, or
`passwd USER` to set a password."""
from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import Sequence

from .allocator import reexec_with_system_malloc
from . import logs, workers
from .app import bound_port, serve
from .reload import reload_settings
from .server import raise_fd_limit
from .store import StoreError
from .settings import parse_settings
from .startup import StartupError

log = logging.getLogger("aivonx")


async def _serve_forever(settings, argv: Sequence[str]) -> None:
    ctx, server = await serve(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if hasattr(signal, "SIGHUP"):
        loop.add_signal_handler(signal.SIGHUP, reload_settings, settings, argv)
    # Only now: whoever waits for this line may send SIGTERM at once.
    log.info("Aivonx listening on http://%s:%d with %d node(s)%s", settings.host,
             bound_port(server), len(ctx.registry.nodes),
             f" (worker {settings.worker_index + 1} of {settings.workers})"
             if settings.workers > 1 else "")
    await stop.wait()
    await shutdown(ctx, server, settings.shutdown_grace)


async def shutdown(ctx, server, grace: float) -> None:
    """Stop accepting, let in-flight requests finish for up to `grace`
    seconds, then close. The store is the truth: nothing needs saving."""
    server.stop()
    deadline = asyncio.get_running_loop().time() + grace
    busy = ctx.registry.total_active() + ctx.scheduler.depth
    if busy:
        log.info("shutting down: waiting up to %g s for %d in-flight request(s)", grace, busy)
    while (ctx.registry.total_active() or ctx.scheduler.depth) and \
            asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    left = ctx.registry.total_active()
    if left:
        log.warning("shutting down: closing %d request(s) still in flight", left)
    await server.close_all_connections()
    ctx.close()
    await ctx.wait_closed()
    log.info("stopped")


def run_loop(main_coroutine) -> None:
    """uvloop where installed: the same relay costs it some 5-10 % less CPU
    per request than asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main_coroutine)
    else:
        uvloop.run(main_coroutine)


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None and sys.argv[1:2] != ["passwd"]:
        reexec_with_system_malloc()  # the real command line only, not a test's call
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["passwd"]:
        from .passwd import main as passwd
        return passwd(argv[1:])
    settings = parse_settings(argv)
    logs.configure(settings.log_level, settings.log_format)
    raise_fd_limit()
    role = workers.take_role()
    if role is not None:
        settings.workers, settings.worker_index = role.count, role.index
        settings.port, settings.worker_lock_fd = role.port, role.lock_fd
    elif settings.workers > 1:
        return workers.supervise(settings)
    try:
        run_loop(_serve_forever(settings, argv))
    except (OSError, StoreError, StartupError) as exc:
        print(f"aivonx: {exc}", file=sys.stderr)
        return 1
    return 0
