"""Liveness of the proxy itself, for supervisors and load balancers."""
from __future__ import annotations

from typing import Any

from .base import BaseHandler


class HealthHandler(BaseHandler):
    def get(self) -> None:
        self.write_json({"status": "healthy"})


def routes(ctx: Any) -> list[tuple]:
    return [(r"/api/health", HealthHandler, {"ctx": ctx})]
