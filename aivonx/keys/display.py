"""What the status page shows of keys and usage: ready-made rows and bars.

Usage is shown per key and per model over the last 24 hours and 30 days as
horizontal bars (server-rendered SVG: the page's CSP allows no inline
script), each bar's length its share of the largest total in its chart.
"""
from __future__ import annotations

import datetime
import time
from typing import Any

from .. import store
from . import KeyService

BAR_WIDTH = 240
MAX_BARS = 12


def _tokens_text(n: int) -> str:
    if n >= 1_000_000:
        return f"{n / 1_000_000:.1f}M"
    if n >= 10_000:
        return f"{n / 1000:.0f}k"
    return str(n)


def chart(rows: list[dict[str, Any]], label: str) -> list[dict[str, Any]]:
    """Bars for the largest totals (tokens, then requests), largest first."""
    rows = sorted(rows, key=lambda r: (r["total_tokens"], r["requests"]), reverse=True)
    rows = rows[:MAX_BARS]
    top = max((r["total_tokens"] for r in rows), default=0) or 1
    return [{"label": str(r[label]), "width": max(2, round(BAR_WIDTH * r["total_tokens"] / top)),
             "text": f"{_tokens_text(r['total_tokens'])} tokens · {r['requests']} requests"
                     + (f" · {r['errors']} errors" if r["errors"] else ""),
             "y": i * 22} for i, r in enumerate(rows)]


def usage_charts(service: KeyService, now: float | None = None) -> list[dict[str, Any]]:
    now = time.time() if now is None else now
    moment = datetime.datetime.fromtimestamp(now, datetime.timezone.utc).replace(tzinfo=None)
    service.flush()
    names = service.names()
    out = []
    for window, since in (("last 24 hours", moment - datetime.timedelta(hours=24)),
                          ("last 30 days", moment - datetime.timedelta(days=30))):
        for group, label in (("key", "key"), ("model", "model")):
            rows = service.usage.report(since, None, None, None, [group], names)
            out.append({"title": f"By {group}, {window}", "bars": chart(rows, label)})
    return out


def key_rows(service: KeyService) -> list[dict[str, Any]]:
    keyring = service.keyring
    rows = store.ApiKey.select().order_by(store.ApiKey.revoked_at.is_null(False),
                                          store.ApiKey.id)
    out = []
    for row in rows:
        data = keyring.key_dict(row)
        limits = [f"{name.replace('_', ' ')} {data[name]}" for name in
                  ("rpm", "max_concurrent", "daily_tokens", "monthly_tokens") if data[name]]
        data["limits_text"] = ", ".join(limits) or "none"
        data["models_text"] = ", ".join(data["models"]) or "every model"
        out.append(data)
    return out
