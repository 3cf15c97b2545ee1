"""The audit log: every admin change and every failed login.

Who (a username, or an admin key's name), from which address, when, what
(method and path, the answer's status, a short detail). Entries wait in
memory and are written with the usage batch, so a flood of failed logins
costs the database a few writes a second, not one per attempt; the
pending list is bounded.
"""
from __future__ import annotations

import datetime
from typing import Any

from .. import store
from .keyring import iso

MAX_PENDING = 10_000


class AuditLog:
    def __init__(self) -> None:
        self.pending: list[dict[str, Any]] = []
        self.dropped = 0

    def record(self, actor: str, address: str, action: str, status: int,
               detail: str = "") -> None:
        if len(self.pending) >= MAX_PENDING:
            self.dropped += 1
            return
        self.pending.append({"at": store.utcnow(), "actor": actor[:200],
                             "address": address[:100], "action": action[:300],
                             "status": status, "detail": detail[:2000]})

    def take(self) -> list[dict[str, Any]]:
        pending, self.pending = self.pending, []
        return pending

    def put_back(self, rows: list[dict[str, Any]]) -> None:
        self.pending[:0] = rows[:MAX_PENDING]

    @staticmethod
    def write(rows: list[dict[str, Any]]) -> None:
        if rows:
            store.AuditEntry.insert_many(rows).execute()

    @staticmethod
    def count() -> int:
        return store.AuditEntry.select().count()

    @staticmethod
    def page(limit: int, offset: int) -> list[dict[str, Any]]:
        """Newest first."""
        rows = (store.AuditEntry.select().order_by(store.AuditEntry.id.desc())
                .limit(limit).offset(offset))
        return [entry_dict(r) for r in rows]


def entry_dict(row: store.AuditEntry) -> dict[str, Any]:
    at = row.at if isinstance(row.at, datetime.datetime) else None
    return {"id": row.id, "at": iso(at), "actor": row.actor, "address": row.address,
            "action": row.action, "status": row.status, "detail": row.detail}
