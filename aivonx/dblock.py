"""One Aivonx process per SQLite database.

Each process keeps its nodes, strategy and health in memory and reads the
database only at start, so two processes on one file drift apart without a
word (one keeps routing to a node the other deleted). The serving process
holds an exclusive lock on `<db>.lock` for its lifetime; a second one
refuses to start. `passwd` does not take it: it only writes a user, which
every process reads on each login.
"""
from __future__ import annotations

import fcntl
import os

from .store import StoreError


class DatabaseLock:
    """An exclusive `flock` on the lock file beside a database, released by
    `release()` or when the process ends (even by SIGKILL)."""

    def __init__(self, db_path: str) -> None:
        self.path = f"{db_path}.lock"
        self._fd: int | None = None
        if db_path == ":memory:" or db_path.startswith("file::memory:"):
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StoreError(f"cannot open the database {db_path}: cannot create "
                             f"{self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StoreError(
                f"the database {db_path} is in use by another Aivonx process (it holds "
                f"{self.path}); instances cannot share a SQLite database: run one process "
                "per database, or give this one its own --db") from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
