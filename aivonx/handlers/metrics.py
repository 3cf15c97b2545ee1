"""GET /metrics for Prometheus."""
from __future__ import annotations

from typing import Any

from .base import BaseHandler


class MetricsHandler(BaseHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.finish(self.ctx.metrics.render(self.ctx))


def routes(ctx: Any) -> list[tuple]:
    return [(r"/metrics", MetricsHandler, {"ctx": ctx})]
