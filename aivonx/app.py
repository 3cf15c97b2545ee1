"""make_app(settings): the shared objects and the route table in one place."""
from __future__ import annotations

import asyncio
import logging
import os
import sys
from typing import Any

import tornado.web
from tornado.httpserver import HTTPServer

from . import catalog, store
from .fanout import fetch_model_lists
from .auth import Auth
from .handlers import (account, anthropic, base, blobs, docs, manage, metrics, modelops,
                       ollama, openai, pages)
from .metrics import Metrics
from .monitor import Monitor
from .registry import NodeState, Registry
from .relay import Relay
from .router import DEFAULT_STRATEGY, STRATEGIES, Router
from .scheduler import Scheduler
from .settings import Settings

log = logging.getLogger("aivonx")



def _asset_root() -> str:
    """Where templates/ and static/ are: beside the package in a checkout,
    under <prefix>/share/aivonx after `pip install .`."""
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for root in (checkout, os.path.join(sys.prefix, "share", "aivonx")):
        if os.path.isdir(os.path.join(root, "templates")):
            return root
    return checkout


ROOT = _asset_root()


class Context:
    """The objects every handler shares: live state, router, relay, monitor."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registry = Registry()
        self.router = Router(self.registry)
        self.scheduler = Scheduler(self.registry, self.router, max_queue=settings.max_queue,
                                   max_wait=settings.max_wait)
        self.metrics = Metrics()
        self.relay = Relay(self.registry, self.router, self.scheduler, self.metrics,
                           connect_timeout=settings.connect_timeout,
                           idle_timeout=settings.idle_timeout,
                           max_body_size=settings.max_body_size)
        self.monitor = Monitor(self.registry, interval=settings.health_interval,
                               timeout=settings.probe_timeout,
                               on_models_changed=self._models_changed,
                               on_status_changed=lambda node: self.scheduler.dispatch())
        self.relay.on_missing_model = self._missing_model
        self.auth = Auth(settings.root_password)
        self.db = None

    # -- store <-> registry ---------------------------------------------------
    def open_store(self) -> None:
        self.db = store.open_database(self.settings.db)
        store.ensure_nodes(self.settings.nodes)
        generated = self.auth.ensure_root()
        if generated:
            log.warning("created user root with the generated password %s (shown only "
                        "once; change it with `python run.py passwd root`)", generated)
        strategy = store.get_config("strategy", DEFAULT_STRATEGY)
        self.router.strategy = strategy if strategy in STRATEGIES else DEFAULT_STRATEGY
        for node in store.Node.select():
            self.sync_node(node)

    def sync_node(self, node: store.Node) -> NodeState:
        """Bring the registry in line with a stored node (after any change)."""
        state = self.registry.upsert(node.id, node.name, node.address, node.port,
                                     node.active, node.models, slots=node.slots,
                                     weight=node.weight)
        self.scheduler.dispatch()  # more capacity may wake waiting requests
        return state

    def _models_changed(self, state: NodeState) -> None:
        if self.db is not None:
            store.save_models(state.id, sorted(state.models.values()))

    def _missing_model(self, state: NodeState) -> None:
        # A node answered 404 for a model it listed: look again right away.
        asyncio.ensure_future(self.monitor.probe(state))

    # -- listings -------------------------------------------------------------
    async def fan_out(self, path: str) -> list[tuple[NodeState, list[dict[str, Any]]]]:
        return await fetch_model_lists(self.monitor.client, self.registry.routable(), path,
                                       self.settings.probe_timeout)

    async def list_tags(self) -> list[dict[str, Any]]:
        """Merged /api/tags of the routable nodes, fetched live (a model just
        pulled shows at once); each answer also refreshes routing."""
        lists = await self.fan_out("/api/tags")
        for node, entries in lists:
            if self.registry.update_tags(node, entries):
                self._models_changed(node)
        return catalog.merge_tags(entries for _, entries in lists)

    async def start(self) -> None:
        """Probe every node once before serving, then keep probing."""
        await self.monitor.probe_all()
        self.monitor.start()

    def close(self) -> None:
        self.monitor.stop()
        self.relay.close()
        if self.db is not None:
            self.db.close()


def make_app(ctx: Context) -> tornado.web.Application:
    documented = [*manage.routes(ctx), *account.routes(ctx), *modelops.routes(ctx),
                  *blobs.routes(ctx)]
    routes = [
        *ollama.routes(ctx),
        *openai.routes(ctx),
        *anthropic.routes(ctx),
        *documented,
        *docs.routes(ctx, documented),
        *metrics.routes(ctx),
        *pages.routes(ctx),
    ]
    return tornado.web.Application(
        routes,
        default_handler_class=base.NotFoundHandler,
        default_handler_args={"ctx": ctx},
        compress_response=False,  # streams must reach clients chunk by chunk
        log_function=base.log_request,
        template_path=os.path.join(ROOT, "templates"),
        static_path=os.path.join(ROOT, "static"),
        # Not xsrf_cookies: that would refuse the Ollama API's POSTs. The
        # status page's forms check the token themselves (handlers/pages.py).
        xsrf_cookie_kwargs=pages.XSRF_COOKIE_KWARGS,
    )


def make_server(ctx: Context) -> HTTPServer:
    """The HTTP server with the limits hostile clients meet: head size and
    time, body size."""
    settings = ctx.settings
    return HTTPServer(make_app(ctx), max_body_size=settings.max_body_size,
                      max_buffer_size=settings.max_body_size,
                      max_header_size=settings.max_header_size,
                      idle_connection_timeout=settings.header_timeout,
                      body_timeout=settings.idle_timeout)


async def serve(settings: Settings) -> tuple[Context, HTTPServer]:
    """Open the store, probe the nodes, listen. Returns what to close."""
    ctx = Context(settings)
    ctx.open_store()
    await ctx.start()
    server = make_server(ctx)
    server.listen(settings.port, address=settings.host)
    return ctx, server


def bound_port(server: HTTPServer) -> int:
    for sock in server._sockets.values():
        return sock.getsockname()[1]
    raise RuntimeError("server is not listening")
