"""The status page: the cluster at a glance in a browser.

One server-rendered page (`/ui`) shows every node and the cluster totals, so
it is complete without JavaScript; static/ui.js then keeps it live by polling
the state JSON and updating the DOM with textContent/createElement only.
"""
from __future__ import annotations

import time
from typing import Any

import tornado.web

from ..registry import HISTORY_LENGTH
from ..status import cluster_state
from .base import BaseHandler

# No inline script or style anywhere: everything comes from static/.
CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
       "frame-ancestors 'none'")

SPARK_WIDTH, SPARK_HEIGHT = 120, 28
CHIP_LIMIT = 8  # model chips shown per node before "+N more"

# What the row template is rendered with, for static/ui.js to clone.
BLANK_NODE = {"id": 0, "name": "", "url": "", "status": "standby", "since": None,
              "reason": "", "latency": None, "latency_history": [], "active_requests": 0,
              "requests_served": 0, "errors": 0, "models": [], "loaded": []}


def ago(since: float | None, now: float | None = None) -> str:
    """How long ago, compactly: 42s, 3m 07s, 5h 02m, 2d 4h."""
    if since is None:
        return "—"
    seconds = max(0, int((time.time() if now is None else now) - since))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h"


def latency_text(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 0.001:
        return "<1 ms"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds:.2f} s"


def spark_points(history: list[float | None]) -> str:
    """SVG polyline points for a latency history, newest at the right edge,
    scaled to the largest sample (static/ui.js draws the same)."""
    values = [v for v in history if v is not None][-HISTORY_LENGTH:]
    if len(values) < 2:
        return ""
    top = max(values) * 1.15 or 1.0
    step = SPARK_WIDTH / (HISTORY_LENGTH - 1)
    offset = SPARK_WIDTH - step * (len(values) - 1)
    usable = SPARK_HEIGHT - 4
    return " ".join(f"{offset + i * step:.1f},{SPARK_HEIGHT - 2 - v / top * usable:.1f}"
                    for i, v in enumerate(values))


def overall(state: dict[str, Any]) -> tuple[str, str]:
    """One line for the whole cluster, and its tone: ok, warn or bad."""
    nodes = state["nodes"]
    active = sum(1 for n in nodes if n["status"] == "active")
    enabled = sum(1 for n in nodes if n["status"] != "drained")
    if not nodes:
        return "No nodes configured", "warn"
    if active == 0:
        return "No node is serving", "bad"
    if active < enabled:
        down = enabled - active
        return f"{down} of {enabled} node{'s' if enabled != 1 else ''} down", "warn"
    return "All nodes serving", "ok"


class PageHandler(BaseHandler):
    """HTML pages: strict security headers, errors as a small HTML page."""

    def set_default_headers(self) -> None:
        super().set_default_headers()
        self.set_header("Content-Security-Policy", CSP)
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Referrer-Policy", "same-origin")
        self.set_header("X-Frame-Options", "DENY")
        # The page shows live state and, once signed in, carries form tokens.
        self.set_header("Cache-Control", "no-store")

    def get_template_namespace(self) -> dict[str, Any]:
        namespace = super().get_template_namespace()
        namespace.update(ago=ago, latency_text=latency_text, spark_points=spark_points,
                         spark_width=SPARK_WIDTH, spark_height=SPARK_HEIGHT,
                         spark_slots=HISTORY_LENGTH, chip_limit=CHIP_LIMIT,
                         blank_node=BLANK_NODE, state_url=self.reverse_url("ui-state"))
        return namespace

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        message = self._reason
        if isinstance(exc, tornado.web.HTTPError) and exc.log_message and status_code < 500:
            message = exc.log_message % exc.args if exc.args else exc.log_message
        self.render("error.html", status_code=status_code, message=message)


class StatusPageHandler(PageHandler):
    def get(self) -> None:
        state = cluster_state(self.ctx)
        summary, tone = overall(state)
        self.render("status.html", state=state, summary=summary, tone=tone, now=time.time())


class StateHandler(BaseHandler):
    """The page's live data as JSON (the same snapshot the state API gives)."""

    def get(self) -> None:
        self.set_header("Cache-Control", "no-store")
        self.write_json(cluster_state(self.ctx))


def routes(ctx: Any) -> list[tuple]:
    args = {"ctx": ctx}
    return [
        tornado.web.url(r"/ui", StatusPageHandler, args, name="ui"),
        tornado.web.url(r"/ui/state", StateHandler, args, name="ui-state"),
    ]
