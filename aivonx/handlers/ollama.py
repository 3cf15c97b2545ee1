"""Ollama's native API, as every Ollama client speaks it."""
from __future__ import annotations


from .. import catalog
from .base import BaseHandler, InferenceListing
from .relayed import NUMBER, ModelRelayHandler


class RootHandler(BaseHandler):
    """Health checks and clients probe `/` for Ollama's greeting."""

    def get(self) -> None:
        # A browser (it asks for HTML) gets the status page; every Ollama
        # client and health check still gets the greeting.
        self.set_header("Vary", "Accept")
        if "text/html" in self.request.headers.get("Accept", ""):
            self.redirect("/ui")
            return
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.finish("Ollama is running")

    def head(self) -> None:
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.set_header("Content-Length", "17")
        self.finish()


class VersionHandler(BaseHandler):
    """The oldest node's version: the features every node has."""

    def version(self) -> dict[str, str]:
        nodes = self.ctx.registry.routable() or list(self.ctx.registry.nodes.values())
        return {"version": catalog.lowest_version(n.version for n in nodes)}

    def get(self) -> None:
        self.write_json(self.version())

    def head(self) -> None:
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish()


class TagsHandler(InferenceListing):
    async def get(self) -> None:
        self.write_encoded_json(await self.ctx.listings.tags_json())

    async def head(self) -> None:
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish()


class PsHandler(InferenceListing):
    async def get(self) -> None:
        self.write_json({"models": await self.ctx.listings.ps()})


class ShowHandler(ModelRelayHandler):
    model_fields = ("model", "name")
    fields = {"verbose": (bool,)}


class GenerateHandler(ModelRelayHandler):
    prompted = True
    keeps_models_loaded = True
    unload_field = "prompt"
    fields = {"prompt": (str,), "suffix": (str,), "system": (str,), "template": (str,),
              "images": (list,), "raw": (bool,), "context": (list,)}


class ChatHandler(ModelRelayHandler):
    prompted = True
    keeps_models_loaded = True
    unload_field = "messages"
    fields = {"messages": (list,), "tools": (list,)}


class EmbedHandler(ModelRelayHandler):
    keeps_models_loaded = True
    fields = {"input": (str, list), "truncate": (bool,), "dimensions": NUMBER}
    not_found = 'model "{}" not found, try pulling it first'


class EmbeddingsHandler(ModelRelayHandler):
    keeps_models_loaded = True
    fields = {"prompt": (str,)}
    not_found = 'model "{}" not found, try pulling it first'
