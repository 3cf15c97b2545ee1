"""Usage counters per key, model and UTC hour, written in batches.

A request adds to an in-memory row (a dict update); the rows are written
to the `usage` table by `flush`, which the key service runs a few times a
second at most, whatever the load: one transaction of upserts per batch.
A crash (kill -9) loses at most the counts since the last batch; a clean
stop writes them. The sums are read back per key, model, hour, day or
month for the usage API and the status page.
"""
from __future__ import annotations

import datetime
from typing import Any, Iterable

import peewee

from .. import store

HOUR = 3600
# Counter positions in a pending row.
REQUESTS, ERRORS, PROMPT, COMPLETION, ESTIMATED, NODE_MS = range(6)
COUNTERS = ("requests", "errors", "prompt_tokens", "completion_tokens", "estimated", "node_ms")
GROUPS = ("key", "model", "hour", "day", "month")


def _hour(now: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(int(now // HOUR) * HOUR, datetime.timezone.utc) \
        .replace(tzinfo=None)


class UsageBook:
    def __init__(self) -> None:
        self.pending: dict[tuple[int, str, datetime.datetime], list[int]] = {}
        self._hour_start = -1.0
        self._hour: datetime.datetime | None = None

    def add(self, key_id: int, model: str, now: float, *, prompt: int = 0,
            completion: int = 0, error: bool = False, estimated: bool = False,
            node_seconds: float = 0.0) -> None:
        """Count one finished request (cheap: no I/O)."""
        if not self._hour_start <= now < self._hour_start + HOUR:
            self._hour_start = (now // HOUR) * HOUR
            self._hour = _hour(now)
        slot = (key_id, model, self._hour)
        row = self.pending.get(slot)
        if row is None:
            row = self.pending[slot] = [0, 0, 0, 0, 0, 0]
        row[REQUESTS] += 1
        row[ERRORS] += error
        row[PROMPT] += prompt
        row[COMPLETION] += completion
        row[ESTIMATED] += estimated
        row[NODE_MS] += int(node_seconds * 1000)

    def take(self) -> dict[tuple[int, str, datetime.datetime], list[int]]:
        pending, self.pending = self.pending, {}
        return pending

    def put_back(self, rows: dict[tuple[int, str, datetime.datetime], list[int]]) -> None:
        """A batch that could not be written (database busy) waits for the next."""
        for slot, counts in rows.items():
            row = self.pending.setdefault(slot, [0, 0, 0, 0, 0, 0])
            for i, value in enumerate(counts):
                row[i] += value

    @staticmethod
    def write(rows: dict[tuple[int, str, datetime.datetime], list[int]]) -> None:
        """Add a batch to the table; call inside a transaction."""
        U = store.Usage
        for (key_id, model, hour), counts in rows.items():
            values = dict(zip(COUNTERS, counts))
            (U.insert(key_id=key_id, model=model[:200], hour=hour, **values)
             .on_conflict(conflict_target=[U.key_id, U.model, U.hour],
                          update={getattr(U, n): getattr(U, n) + peewee.EXCLUDED[n]
                                  for n in COUNTERS})
             .execute())

    # -- reading -----------------------------------------------------------------
    @staticmethod
    def tokens_since(since: datetime.datetime) -> dict[int, int]:
        U = store.Usage
        rows = (U.select(U.key_id, peewee.fn.SUM(U.prompt_tokens + U.completion_tokens))
                .where(U.hour >= since).group_by(U.key_id).tuples())
        return {key_id: int(total or 0) for key_id, total in rows}

    @staticmethod
    def report(start: datetime.datetime | None, end: datetime.datetime | None,
               key_id: int | None, model: str | None, group_by: Iterable[str],
               names: dict[int, str]) -> list[dict[str, Any]]:
        """Sums of the counters over [start, end), grouped as asked."""
        U = store.Usage
        groups = [g for g in GROUPS if g in set(group_by)]
        columns: list[Any] = []
        for group in groups:
            if group == "key":
                columns.append(U.key_id)
            elif group == "model":
                columns.append(U.model)
            else:
                columns.append(store.format_time(U.hour, group))
        sums = [peewee.fn.SUM(getattr(U, n)) for n in COUNTERS]
        query = U.select(*columns, *sums)
        if start is not None:
            query = query.where(U.hour >= start)
        if end is not None:
            query = query.where(U.hour < end)
        if key_id is not None:
            query = query.where(U.key_id == key_id)
        if model is not None:
            query = query.where(U.model == model)
        if columns:
            query = query.group_by(*columns).order_by(*columns)
        out = []
        for values in query.tuples():
            row: dict[str, Any] = {}
            for group, value in zip(groups, values):
                if group == "key":
                    row["key_id"] = value
                    row["key"] = names.get(value, f"key {value}")
                else:
                    row[group] = value
            counts = [int(v or 0) for v in values[len(groups):]]
            row.update(zip(COUNTERS, counts))
            row["total_tokens"] = row["prompt_tokens"] + row["completion_tokens"]
            if row["requests"] or columns:
                out.append(row)
        return out
