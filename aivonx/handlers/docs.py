"""The OpenAPI document and its two readers, Swagger UI and ReDoc, served
from the vendored files in static/vendor (no CDN: nodes are often offline)."""
from __future__ import annotations

import asyncio
import json

from ..openapi import build_spec
from ..context import Context
from .base import BaseHandler

# ReDoc shows a logo from a CDN; the page must not reach out for it.
DOCS_CSP = "img-src 'self' data:"


class SchemaCache:
    """The document is built once, off the event loop (parsing every
    handler's YAML takes tens of milliseconds)."""

    def __init__(self, routes: list[tuple]) -> None:
        self.routes = routes
        self._body: asyncio.Future | None = None

    def _build(self) -> bytes:
        return json.dumps(build_spec(self.routes), separators=(",", ":")).encode()

    async def body(self) -> bytes:
        if self._body is None:
            self._body = asyncio.ensure_future(
                asyncio.get_running_loop().run_in_executor(None, self._build))
        return await asyncio.shield(self._body)


class SchemaHandler(BaseHandler):
    def initialize(self, ctx: Context, cache: SchemaCache) -> None:
        super().initialize(ctx)
        self.cache = cache

    async def get(self) -> None:
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(await self.cache.body())


class DocsPageHandler(BaseHandler):
    def initialize(self, ctx: Context, template: str) -> None:
        super().initialize(ctx)
        self.template = template

    def get(self) -> None:
        self.set_header("Content-Security-Policy", DOCS_CSP)
        self.set_header("X-Content-Type-Options", "nosniff")
        self.render(self.template, spec_url="/api/schema")
