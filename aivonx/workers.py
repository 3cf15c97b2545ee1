"""`--workers N`: N processes serve one port, for a machine with more cores.

One Aivonx process relays on one core. With `--workers N` the command
becomes a supervisor that serves nothing itself: it opens the store once
(the root user and the --node rows are written there, and only there), holds
the database's lock (aivonx.dblock) for its whole life and starts N worker
processes, its children, which inherit the locked descriptor: the lock still
says "one Aivonx per database", and the workers are that one Aivonx. Each
worker checks that the descriptor it was given really holds the lock before
it opens the store, so no unrelated process gets in this way.

Every worker binds the port with SO_REUSEPORT and the kernel spreads the
connections over them. The workers share no memory:

- each takes an equal share of every node's slots (slot_share; the first
  `slots % N` workers one more, and never fewer than one, so with fewer
  slots than workers a node takes up to N requests at once);
- each probes the nodes itself, and keeps its own queue, breakers and
  metrics (/metrics and the status page show the worker that answered);
- an admin change (node, strategy, user) is written to the store by the
  worker that received it; the others read the store's nodes and strategy
  every REFRESH_INTERVAL seconds and apply what changed, so a change
  reaches every worker within that time;
- the login attempt limit counts per worker.

The supervisor forwards SIGTERM, SIGINT and SIGHUP to the workers. When a
worker dies, it stops the others and exits non-zero, for the service
manager to restart the whole; workers die with the supervisor
(PR_SET_PDEATHSIG).
"""
from __future__ import annotations

import asyncio
import ctypes
import fcntl
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from .dblock import DatabaseLock
from .settings import Settings
from .store import StoreError

log = logging.getLogger("aivonx.workers")

ENV = "AIVONX_WORKER"  # "index/count/lock fd/port", set by the supervisor for its workers
REFRESH_INTERVAL = 2.0
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class WorkerRole:
    index: int
    count: int
    lock_fd: int | None
    port: int


def take_role() -> WorkerRole | None:
    """This process's role when the supervisor started it (the variable is
    removed, so nothing this worker starts takes it for its own)."""
    value = os.environ.pop(ENV, None)
    if value is None:
        return None
    index, count, lock_fd, port = value.split("/")
    return WorkerRole(int(index), int(count), int(lock_fd) if lock_fd != "-" else None,
                      int(port))


def slot_share(slots: int, index: int, count: int) -> int:
    """Worker `index` of `count`'s part of a node's `slots`."""
    if count <= 1:
        return slots
    return max(1, slots // count + (1 if index < slots % count else 0))


def inherited_lock(db_path: str, fd: int | None) -> DatabaseLock:
    """The supervisor's lock on the database, through the descriptor this
    worker inherited: flock succeeds on it only if it is that very lock."""
    lock = DatabaseLock(":memory:")  # holds nothing yet
    if fd is None:
        return lock  # an in-memory database has no lock file
    expected = os.stat(f"{db_path}.lock")
    actual = os.fstat(fd)
    if (expected.st_dev, expected.st_ino) != (actual.st_dev, actual.st_ino):
        raise StoreError(f"the descriptor given for {db_path}.lock is not that file")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise StoreError(f"the database {db_path} is locked by another process") from None
    lock.path, lock._fd = f"{db_path}.lock", fd
    return lock


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A socket bound with SO_REUSEPORT, not listening: it keeps a port picked
    with --port 0 for the workers (the kernel hands connections only to
    sockets that listen)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def _prepare_store(settings: Settings) -> DatabaseLock | None:
    """What the first start writes, done once: root user, --node rows."""
    from .context import Context  # the whole service graph, only for this step

    async def prepare() -> DatabaseLock | None:
        ctx = Context(settings)
        ctx.open_store()
        lock, ctx.db_lock = ctx.db_lock, None  # kept past ctx.close()
        ctx.close()
        return lock

    return asyncio.run(prepare())


def _die_with_parent() -> None:
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def supervise(settings: Settings) -> int:
    """Run `settings.workers` workers on one port until told to stop."""
    if not hasattr(socket, "SO_REUSEPORT"):
        print("aivonx: --workers needs SO_REUSEPORT (Linux, BSD)", file=sys.stderr)
        return 1
    try:
        lock = _prepare_store(settings)
    except (OSError, StoreError) as exc:
        print(f"aivonx: {exc}", file=sys.stderr)
        return 1
    reserved = reuse_port_socket(settings.host, settings.port)
    port = reserved.getsockname()[1]
    lock_fd = lock._fd if lock is not None else None
    argv = [sys.executable, *sys.orig_argv[1:]]
    workers: list[subprocess.Popen] = []
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        if signum != getattr(signal, "SIGHUP", None):
            stopping = True
        for proc in workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM if signum == signal.SIGINT else signum)

    for signum in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGHUP", None)):
        if signum is not None:
            signal.signal(signum, forward)
    try:
        for index in range(settings.workers):
            env = {**os.environ,
                   ENV: f"{index}/{settings.workers}/{'-' if lock_fd is None else lock_fd}"
                        f"/{port}"}
            workers.append(subprocess.Popen(
                argv, env=env, pass_fds=() if lock_fd is None else (lock_fd,),
                preexec_fn=_die_with_parent))
        log.info("supervising %d workers on port %d", settings.workers, port)
        while not stopping:
            dead = [proc for proc in workers if proc.poll() is not None]
            if dead:
                log.error("worker %d exited with %s: stopping the others",
                          workers.index(dead[0]), dead[0].returncode)
                break
            time.sleep(0.2)
    finally:
        for proc in workers:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + settings.shutdown_grace + 5
        for proc in workers:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        reserved.close()
        if lock is not None:
            lock.release()
    return 0 if stopping else 1
