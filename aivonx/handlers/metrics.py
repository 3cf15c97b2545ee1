"""GET /metrics for Prometheus."""
from __future__ import annotations


from .base import BaseHandler


class MetricsHandler(BaseHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.finish(self.ctx.metrics.render(self.ctx.registry, self.ctx.scheduler,
                                               self.ctx.cluster))
