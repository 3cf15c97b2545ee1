"""A fake node's prompt cache, modelled on Ollama's multi-user cache
(OLLAMA_MULTIUSER_CACHE, the setting for a server many users share): per
model, `slots` KV caches, each holding the last prompt processed in it.

A request reuses the longest prefix its prompt shares with any slot's
cached prompt (one in use included: Ollama copies that prefix into the slot
it takes). It extends a free slot when its prompt continues that slot's,
else it takes the least recently used free slot, so that other prompts
stay cached. It prefills only the rest: its time to first chunk is
`base + per_token x (prompt tokens not shared)`, tokens being whitespace
words (a role counts as one). The counters say how much was reused, so a
benchmark can compare routing strategies by the work the nodes did.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from typing import Any


def _words(value: Any) -> list[str]:
    """The words of a text, or of the text parts of a list of content blocks."""
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list):
        return [w for part in value for w in _words(
            part.get("text", part.get("content")) if isinstance(part, dict) else part)]
    return []


def prompt_tokens(body: Any) -> list[str]:
    """A request's prompt as the model reads it, in order: system prompt and
    instructions, then each message's role and words, or the prompt."""
    if not isinstance(body, dict):
        return []
    tokens = _words(body.get("system")) + _words(body.get("instructions"))
    for name in ("messages", "input"):
        value = body.get(name)
        if isinstance(value, list):
            for message in value:
                if isinstance(message, dict):
                    tokens.append(f"<{message.get('role', '')}>")
                    tokens += _words(message.get("content"))
        elif name == "input":
            tokens += _words(value)
    return tokens + _words(body.get("prompt"))


@dataclass(eq=False)
class Slot:
    tokens: list[str] = field(default_factory=list)
    busy: bool = False
    used: int = 0  # when it was last taken, for least recently used


class Lease:
    """A slot held by one request; `delay` is its prefill time."""

    def __init__(self, delay: float, shared: int, slot: Slot | None) -> None:
        self.delay = delay
        self.shared = shared
        self.slot = slot

    def release(self) -> None:
        if self.slot is not None:
            self.slot.busy = False
            self.slot = None


class PrefixCache:
    def __init__(self, *, slots: int = 4, per_token: float = 0.0005,
                 base: float = 0.02) -> None:
        self.slots = slots
        self.per_token = per_token
        self.base = base
        self.models: dict[str, list[Slot]] = {}
        self._clock = itertools.count(1)
        self.requests = 0
        self.hits = 0              # requests that reused some cached prefix
        self.tokens_prefilled = 0  # prompt tokens computed
        self.tokens_reused = 0     # prompt tokens taken from a cache

    def admit(self, model: str, body: Any) -> Lease:
        """Take the best free slot of `model` for this request's prompt."""
        tokens = prompt_tokens(body)
        slots = self.models.setdefault(model, [Slot() for _ in range(self.slots)])
        free = [s for s in slots if not s.busy]
        shared, slot = 0, None
        if free:
            scored = [(len(os.path.commonprefix([s.tokens, tokens])), s) for s in slots]
            shared, slot = max(scored, key=lambda t: t[0])
            if slot.busy or shared < len(slot.tokens):
                # Not a free slot this prompt extends: the shared prefix is copied
                # to the least recently used free slot, and the other prompt stays.
                slot = min(free, key=lambda s: s.used)
            slot.busy, slot.used, slot.tokens = True, next(self._clock), tokens
        self.requests += 1
        self.hits += shared > 0
        self.tokens_reused += shared
        self.tokens_prefilled += len(tokens) - shared
        return Lease(self.base + self.per_token * (len(tokens) - shared), shared, slot)

    def forget(self, model: str) -> None:
        """The model left memory: its caches went with it."""
        self.models.pop(model, None)

    def stats(self) -> dict[str, Any]:
        return {"requests": self.requests, "hits": self.hits,
                "tokens_prefilled": self.tokens_prefilled, "tokens_reused": self.tokens_reused,
                "slots": self.slots, "per_token": self.per_token, "base": self.base}
