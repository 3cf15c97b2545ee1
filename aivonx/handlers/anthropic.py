"""Ollama's Anthropic-compatible Messages API, errors in Anthropic's shape.

Claude Code and the anthropic SDKs talk to Ollama through `/v1/messages`;
they send their key as `x-api-key`, which, like every client credential,
stays at the proxy.
"""
from __future__ import annotations


from .relayed import NUMBER, ModelRelayHandler


class MessagesHandler(ModelRelayHandler):
    prompted = True
    error_style = "anthropic"
    fields = {"messages": (list,), "max_tokens": NUMBER, "system": (str, list),
              "tools": (list,), "thinking": (dict,), "stop_sequences": (list,)}

