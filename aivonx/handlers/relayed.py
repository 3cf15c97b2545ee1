"""Handlers that route a request by its model and relay it to a node.

Shared by the native Ollama endpoints and the OpenAI-compatible ones: they
differ only in the error dialect and in the fields they check.
"""
from __future__ import annotations

import time
from typing import Any

from .. import bodyscan, modelnames, prefix
from ..bodyscan import Large
from ..modelops import Cancel, is_unload
from ..relay import ClientSink, Exchange
from ..router import NoHealthyNode, NoSuchModel
from ..scheduler import QueueFull, QueueTimeout
from ..errors import ApiError
from ..keys import UNKNOWN_MODEL, Key, Meter
from .base import INLINE_JSON_LIMIT, BaseHandler

# Seconds a client is told to wait when every node is busy or down.
RETRY_AFTER = 2

def check_types(body: dict[str, Any], fields: dict[str, tuple[type, ...]]) -> None:
    """Wrong types get a 400 here rather than a confusing error from a node."""
    for name, types in fields.items():
        value = body.get(name)
        if value is None:
            continue
        # bool is an int in Python; JSON keeps them apart.
        if isinstance(value, Large):
            ok = value.kind in {_KIND.get(t) for t in types}
        elif isinstance(value, bool) and bool not in types:
            ok = False
        else:
            ok = isinstance(value, types)
        if not ok:
            expected = " or ".join(_json_type(t) for t in types)
            raise ApiError(400, f"invalid value for '{name}': expected {expected}")


_KIND = {str: "string", list: "array", dict: "object", int: "number", float: "number"}


def _json_type(t: type) -> str:
    return {str: "a string", bool: "a boolean", list: "an array", dict: "an object",
            int: "a number", float: "a number"}.get(t, t.__name__)


NUMBER = (int, float)
COMMON_FIELDS: dict[str, tuple[type, ...]] = {
    "stream": (bool,), "options": (dict,), "keep_alive": (str, int, float),
}


class ModelRelayHandler(BaseHandler):
    """POST a JSON body naming a model; relay to the best node that has it."""

    # Where the model name is read from, in order (/api/show accepts "name").
    model_fields: tuple[str, ...] = ("model",)
    fields: dict[str, tuple[type, ...]] = {}
    # Ollama's own not-found wording differs between endpoints.
    not_found = "model '{}' not found"
    # Where the answer carries its token counts (aivonx.keys.meter.READERS);
    # None: as the error dialect says.
    usage_style: str | None = None

    # The field that, empty with keep_alive 0, makes the request an unload.
    unload_field: str | None = None
    # Generations reuse a node's cached prompt prefix (cache_aware routing).
    prompted = False
    # Whether the admins' keep_alive policy (aivonx.keepalive) applies here.
    keeps_models_loaded = False

    exchange: Exchange | None = None
    unloading: Cancel | None = None
    log_model: str | None = None
    log_key: str | None = None
    client_gone = False

    max_body = None  # prompts with images: up to the server-wide limit

    def on_connection_close(self) -> None:
        super().on_connection_close()
        self.client_gone = True
        if self.exchange is not None:
            self.exchange.cancel()
        if self.unloading is not None:
            self.unloading.cancel()

    def model_name(self, body: dict[str, Any]) -> str:
        for field in self.model_fields:
            value = body.get(field)
            if value is not None:
                if not isinstance(value, str):
                    raise ApiError(400, f"invalid value for '{field}': expected a string")
                if value.strip():
                    return value
        raise ApiError(400, "model is required")

    def model_key(self, name: str) -> str:
        try:
            return modelnames.canonical(name)
        except modelnames.InvalidModelName as exc:
            if str(exc) == "model is required":
                raise ApiError(400, "model is required") from None
            raise ApiError(400, f"invalid model name: {exc}") from None

    async def relay_body(self) -> dict[str, Any]:
        """The body's top level: parsed whole when small; when large, scanned
        for its small fields (aivonx.bodyscan), the node parses the rest."""
        body = self.request.body
        if len(body) <= INLINE_JSON_LIMIT:
            return await self.json_body()
        try:
            return await bodyscan.scan_yielding(body)
        except UnicodeDecodeError:
            raise ApiError(400, "invalid request body: not UTF-8") from None
        except bodyscan.ScanError as exc:
            raise ApiError(400, f"invalid JSON in request body: {exc}") from None
        except ValueError as exc:
            raise ApiError(400, f"invalid JSON in request body: {exc}") from None

    async def post(self) -> None:
        received_at = time.monotonic()
        client = self.inference_key()
        self.log_key = client.name  # for the access log
        body = await self.relay_body()
        check_types(body, {**COMMON_FIELDS, **self.fields})
        name = self.model_name(body)
        key = self.model_key(name)
        if self.client_gone:
            return
        ctx = self.ctx
        relayed = self.request.body
        if self.keeps_models_loaded:
            relayed = ctx.keep_alive.apply(key, body, relayed) or relayed
        await ctx.keys.admit(client, key, name)
        self.log_model = ctx.registry.model_label(key)  # also for the access log
        hint = (prefix.routing_hint(key, body, self.request.headers, self.request.body)
                if self.prompted and ctx.router.strategy == "cache_aware" else None)
        meter: Meter | None = Meter(self.usage_style or self.error_style,
                                    prompt_estimate=len(self.request.body) // 4)
        usage_model = self.log_model
        try:
            if self.unload_field is not None and is_unload(body, self.unload_field):
                if await self.unload(name, key, body):
                    meter = None  # answered by the proxy: no tokens, no error
                    return
            await self.relay(client, name, key, relayed, meter, received_at, hint)
        except NoSuchModel:
            usage_model = UNKNOWN_MODEL  # never a usage row named by what a client sent
            raise ApiError(404, self.not_found.format(name[:200])) from None
        finally:
            ctx.keys.finish(client, usage_model, meter)
        if not self.client_gone and not self.request.connection.stream.closed():
            self.finish()

    async def relay(self, client: Key, name: str, key: str, relayed: bytes, meter: Meter,
                    received_at: float, hint: Any) -> None:
        """Relay to the best node for the model; the proxy's own refusals
        as errors in the client's dialect."""
        ctx = self.ctx
        self.exchange = Exchange(ctx.relay, ClientSink(self, self.error_style),
                                 self.request.method, self.request.uri, self.request.headers,
                                 relayed, model=self.log_model,
                                 received_at=received_at, owner=client.id,
                                 priority=client.priority, observer=meter, hint=hint)
        try:
            await self.exchange.run(key)
        except NoHealthyNode:
            ctx.metrics.rejected[("no_healthy_node",)] += 1
            raise ApiError(503, f"no node that has model '{name[:200]}' is available; "
                                "please try again", {"Retry-After": str(RETRY_AFTER)}) from None
        except (QueueFull, QueueTimeout) as exc:
            ctx.metrics.rejected[(type(exc).__name__.lower(),)] += 1
            raise ApiError(503, f"server busy, please try again: {exc}",
                           {"Retry-After": str(RETRY_AFTER)}) from None
        finally:
            self.exchange = None  # the exchange points back at this handler

    async def unload(self, name: str, key: str, body: dict[str, Any]) -> bool:
        """Every node holding the model in memory lets it go, answered once.
        False when none holds it: the request is relayed as any other."""
        self.unloading = Cancel()
        result = await self.ctx.modelops.unload(name, key, self.request.path, body,
                                                self.unloading)
        if result is None:
            return False
        if result.cancelled:
            return True
        if not result.ok:
            raise ApiError(result.status, result.message)
        self.write_json(result.answer)
        return True
