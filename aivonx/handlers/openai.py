"""Ollama's OpenAI-compatible API under /v1, errors in OpenAI's shape."""
from __future__ import annotations


from .. import catalog, modelnames
from ..errors import ApiError
from .base import InferenceListing
from .relayed import ModelRelayHandler


class OpenAIHandler(ModelRelayHandler):
    error_style = "openai"


class ChatCompletionsHandler(OpenAIHandler):
    prompted = True
    fields = {"messages": (list,), "stream_options": (dict,)}


class CompletionsHandler(OpenAIHandler):
    prompted = True
    fields = {"prompt": (str, list), "stream_options": (dict,)}


class OpenAIEmbeddingsHandler(OpenAIHandler):
    fields = {"input": (str, list), "encoding_format": (str,)}
    not_found = 'model "{}" not found, try pulling it first'


class ResponsesHandler(OpenAIHandler):
    """The Responses API, stateless as Ollama serves it; a broken stream ends
    with the Responses `error` event."""

    error_style = "responses"
    prompted = True
    fields = {"input": (str, list), "instructions": (str,), "tools": (list,),
              "reasoning": (dict,), "text": (dict,)}


class ModelsHandler(InferenceListing):
    error_style = "openai"

    async def get(self) -> None:
        self.write_encoded_json(await self.ctx.listings.openai_models_json())


class ModelHandler(InferenceListing):
    error_style = "openai"

    async def get(self, model: str) -> None:
        try:
            entry = await self.ctx.listings.find_model(model)
        except modelnames.InvalidModelName:
            entry = None
        if entry is None:
            raise ApiError(404, f"model '{model[:200]}' not found")
        self.write_json(catalog.openai_model(entry, model_id=model))
