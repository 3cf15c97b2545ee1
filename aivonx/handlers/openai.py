"""Ollama's OpenAI-compatible API under /v1, errors in OpenAI's shape."""
from __future__ import annotations


from .. import catalog, modelnames
from ..errors import ApiError
from .base import InferenceListing
from .relayed import ModelRelayHandler


class OpenAIHandler(ModelRelayHandler):
    error_style = "openai"


class ChatCompletionsHandler(OpenAIHandler):
    fields = {"messages": (list,), "stream_options": (dict,)}


class CompletionsHandler(OpenAIHandler):
    fields = {"prompt": (str, list), "stream_options": (dict,)}


class OpenAIEmbeddingsHandler(OpenAIHandler):
    fields = {"input": (str, list), "encoding_format": (str,)}
    not_found = 'model "{}" not found, try pulling it first'


class ModelsHandler(InferenceListing):
    error_style = "openai"

    async def get(self) -> None:
        self.write_json(catalog.openai_model_list(await self.ctx.listings.tags()))


class ModelHandler(InferenceListing):
    error_style = "openai"

    async def get(self, model: str) -> None:
        try:
            entry = catalog.find_model(await self.ctx.listings.tags(), model)
        except modelnames.InvalidModelName:
            entry = None
        if entry is None:
            raise ApiError(404, f"model '{model[:200]}' not found")
        self.write_json(catalog.openai_model(entry, model_id=model))
