"""Background work that outlives the call that started it.

A bare `ensure_future` can be garbage-collected mid-flight and swallows its
exception; here every task is referenced until it ends, its failure is
logged, and whatever still runs at shutdown is cancelled.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable

log = logging.getLogger("aivonx.tasks")


class BackgroundTasks:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Future] = set()

    def spawn(self, work: Awaitable[Any], what: str) -> asyncio.Future:
        """Run `work` in the background; `what` names it in the log."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)

        def done(finished: asyncio.Future) -> None:
            self._tasks.discard(finished)
            if not finished.cancelled() and finished.exception() is not None:
                log.warning("%s failed: %s", what, finished.exception())

        task.add_done_callback(done)
        return task

    def __len__(self) -> int:
        return len(self._tasks)

    def cancel_all(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        self._tasks.clear()
