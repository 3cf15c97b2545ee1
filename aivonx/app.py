"""The route table in one place, the application and the server around it."""
from __future__ import annotations

import os
import sys

import tornado.web
from tornado.httpserver import HTTPServer

from .context import Context
from .intake import GuardedApplication
from .handlers import (account, anthropic, base, blobs, docs, forms, keypages, keys, manage,
                       metrics, modelops, ollama, openai, pages)
from .server import BoundedHTTPServer
from .settings import Settings
from .startup import StartupError, check_no_loop


def _asset_root() -> str:
    """Where templates/ and static/ are: inside the package in the one-file
    build (scripts/build_zipapp.py), beside it in a checkout, under
    <prefix>/share/aivonx after `pip install .`."""
    package = os.path.dirname(os.path.abspath(__file__))
    checkout = os.path.dirname(package)
    for root in (os.path.join(package, "assets"), checkout,
                 os.path.join(sys.prefix, "share", "aivonx")):
        if os.path.isdir(os.path.join(root, "templates")):
            return root
    return checkout


ROOT = _asset_root()


def documented_routes(ctx: Context | None) -> list[tuple]:
    """The routes the OpenAPI document describes."""
    args = {"ctx": ctx}
    return [
        # Management API: cluster state (public), config and nodes (admin token)
        (r"/api/health", manage.HealthHandler, args),
        (r"/api/proxy", manage.ProxyStatusHandler, args),
        (r"/api/proxy/state", manage.StateHandler, args),
        (r"/api/proxy/active-requests", manage.ActiveRequestsHandler, args),
        (r"/api/proxy/config", manage.ConfigHandler, args),
        (r"/api/proxy/nodes", manage.NodesHandler, args),
        (r"/api/proxy/nodes/([0-9]+)", manage.NodeHandler, args),
        # Keys, their usage and the audit log (admin token)
        (r"/api/proxy/keys", keys.KeysHandler, args),
        (r"/api/proxy/keys/([0-9]+)", keys.KeyHandler, args),
        (r"/api/proxy/usage", keys.UsageHandler, args),
        (r"/api/proxy/audit", keys.AuditHandler, args),
        # Accounts: access and refresh tokens
        (r"/api/account/login", account.LoginHandler, args),
        (r"/api/account/refresh", account.RefreshHandler, args),
        (r"/api/account/logout", account.LogoutHandler, args),
        # Model operations across the cluster (admin token)
        (r"/api/proxy/pull", modelops.ProxyPullHandler, args),
        (r"/api/pull", modelops.PullHandler, args),
        (r"/api/create", modelops.CreateHandler, args),
        (r"/api/push", modelops.PushHandler, args),
        (r"/api/copy", modelops.CopyHandler, args),
        (r"/api/delete", modelops.DeleteHandler, args),
        (r"/api/blobs/(?P<digest>[^/]+)", blobs.BlobHandler, args),
    ]


def routes(ctx: Context) -> list[tuple]:
    """Every path Aivonx serves; unknown ones get Ollama's 404."""
    args = {"ctx": ctx}
    documented = documented_routes(ctx)
    return [
        # Ollama's native API, relayed to the node that has the model
        (r"/", ollama.RootHandler, args),
        (r"/api/version", ollama.VersionHandler, args),
        (r"/api/tags", ollama.TagsHandler, args),
        (r"/api/ps", ollama.PsHandler, args),
        (r"/api/show", ollama.ShowHandler, args),
        (r"/api/generate", ollama.GenerateHandler, args),
        (r"/api/chat", ollama.ChatHandler, args),
        (r"/api/embed", ollama.EmbedHandler, args),
        (r"/api/embeddings", ollama.EmbeddingsHandler, args),
        # Ollama's OpenAI-compatible API
        (r"/v1/chat/completions", openai.ChatCompletionsHandler, args),
        (r"/v1/completions", openai.CompletionsHandler, args),
        (r"/v1/embeddings", openai.OpenAIEmbeddingsHandler, args),
        (r"/v1/models", openai.ModelsHandler, args),
        (r"/v1/models/([^/]+)", openai.ModelHandler, args),
        (r"/v1/responses", openai.ResponsesHandler, args),
        # Ollama's Anthropic-compatible API
        (r"/v1/messages", anthropic.MessagesHandler, args),
        *documented,
        # The API's documentation
        (r"/api/schema", docs.SchemaHandler, {**args, "cache": docs.SchemaCache(documented)}),
        (r"/swagger", docs.DocsPageHandler, {**args, "template": "docs/swagger.html"}),
        (r"/redoc", docs.DocsPageHandler, {**args, "template": "docs/redoc.html"}),
        # Prometheus
        (r"/metrics", metrics.MetricsHandler, args),
        # The status page and its forms
        (r"/ui", pages.StatusPageHandler, args),
        (r"/ui/login", pages.LoginPageHandler, args),
        (r"/ui/logout", forms.LogoutFormHandler, args),
        (r"/ui/nodes", forms.AddNodeHandler, args),
        (r"/ui/nodes/([0-9]+)", forms.EditNodeHandler, args),
        (r"/ui/nodes/([0-9]+)/drain", forms.DrainNodeHandler, args),
        (r"/ui/nodes/([0-9]+)/delete", forms.DeleteNodeHandler, args),
        (r"/ui/strategy", forms.StrategyHandler, args),
        (r"/ui/pull", forms.PullFormHandler, args),
        (r"/ui/keys", keypages.CreateKeyHandler, args),
        (r"/ui/keys/([0-9]+)/revoke", keypages.RevokeKeyHandler, args),
    ]


def make_app(ctx: Context) -> tornado.web.Application:
    settings = ctx.settings
    return GuardedApplication(
        routes(ctx),
        budget=ctx.body_budget,
        max_body=settings.max_body_size,
        body_timeout=settings.body_timeout,
        default_handler_class=base.NotFoundHandler,
        default_handler_args={"ctx": ctx},
        compress_response=False,  # streams must reach clients chunk by chunk
        log_function=base.log_request,
        template_path=os.path.join(ROOT, "templates"),
        ui_modules={"KeysPanel": keypages.KeysPanel},
        static_path=os.path.join(ROOT, "static"),
        static_handler_class=pages.StaticAssetHandler,
        # Not xsrf_cookies: that would refuse the Ollama API's POSTs. The
        # status page's forms check the token themselves (handlers/forms.py).
        xsrf_cookie_kwargs=pages.XSRF_COOKIE_KWARGS,
    )


def make_server(ctx: Context) -> HTTPServer:
    """The HTTP server with the limits hostile clients meet: head size and
    time, body size."""
    settings = ctx.settings
    return BoundedHTTPServer(make_app(ctx), max_connections=settings.max_connections,
                             max_body_size=settings.max_body_size,
                             max_buffer_size=settings.max_body_size,
                             max_header_size=settings.max_header_size,
                             idle_connection_timeout=settings.header_timeout)


async def serve(settings: Settings) -> tuple[Context, HTTPServer]:
    """Open the store, probe the nodes, listen. Returns what to close."""
    ctx = Context(settings)
    ctx.open_store()
    try:
        check_no_loop(settings.host, settings.port,
                      ((n.name, n.address, n.port) for n in ctx.registry.nodes.values()))
    except StartupError:
        ctx.close()
        raise
    await ctx.start()
    server = make_server(ctx)
    server.listen(settings.port, address=settings.host)
    return ctx, server


def bound_port(server: HTTPServer) -> int:
    for sock in server._sockets.values():
        return sock.getsockname()[1]
    raise RuntimeError("server is not listening")
