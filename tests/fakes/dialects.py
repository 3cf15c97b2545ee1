"""What the fake node answers in Ollama's newer fields and in its two translated dialects.

Ollama serves `/v1/messages` (Anthropic) and `/v1/responses` (OpenAI Responses) by
translating the request into a native chat request and each native chat chunk into
the dialect's events (its `middleware/anthropic.go`, `anthropic/anthropic.go`,
`middleware/openai.go`, `openai/responses.go`). The fake does the same: a `Turn`
produces native chat chunks, and the converters here turn them into events exactly
in the order and shape Ollama emits them.
"""
from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Iterator


def _split(text: str, parts: int) -> list[str]:
    """`text` in `parts` consecutive pieces (some may be empty when text is short)."""
    parts = max(1, parts)
    size = -(-len(text) // parts)
    return [text[i * size:(i + 1) * size] for i in range(parts)]


def _sample(schema: object) -> object:
    """A value of a JSON schema's type (what a model constrained by `format` writes)."""
    if not isinstance(schema, dict):
        return "tok0"
    kind = schema.get("type")
    if kind == "object" or "properties" in schema:
        return {key: _sample(sub) for key, sub in (schema.get("properties") or {}).items()}
    if kind == "array":
        return [_sample(schema.get("items"))]
    if kind in ("integer", "number"):
        return 0
    if kind == "boolean":
        return True
    return "tok0"


@dataclass
class Turn:
    """One assistant turn as native chat chunks (the `message` objects and the final one).

    * ``think``: thinking tokens ("think0 ", ...) come first, in `message.thinking`.
    * ``tools``: ``[(name, parameters schema)]``; when given, and the conversation does not
      end with a tool's answer, the turn is one call of the first tool (no content).
    * ``schema``: `format` was given (a JSON schema, or "json"): the content is a JSON
      document, split across the chunks.
    * ``logprobs``: None (off) or the number of `top_logprobs`; each content chunk then
      carries its `logprobs`.
    """

    tokens: list[str]
    think: bool = False
    tools: list[tuple[str, object]] = field(default_factory=list)
    answered_tool: bool = False
    schema: object = None
    logprobs: int | None = None

    def __post_init__(self) -> None:
        self.thinking = [f"think{i} " for i in range(2)] if self.think else []
        self.calls: list[dict[str, Any]] = []
        if self.tools and not self.answered_tool:
            name, parameters = self.tools[0]
            arguments = _sample(parameters) if isinstance(parameters, dict) else {}
            self.calls = [{"id": f"call_{os.urandom(4).hex()}",
                           "function": {"index": 0, "name": name,
                                        "arguments": arguments or {}}}]
            self.content: list[str] = []
        elif self.schema is not None:
            document = _sample(self.schema) if isinstance(self.schema, dict) else {"text": "tok0"}
            self.content = _split(json.dumps(document), len(self.tokens))
        else:
            self.content = list(self.tokens)

    def _logprobs(self, text: str) -> list[dict[str, Any]]:
        entry: dict[str, Any] = {"token": text, "logprob": -0.25, "bytes": list(text.encode())}
        if self.logprobs:
            entry["top_logprobs"] = [{"token": text, "logprob": -0.25,
                                      "bytes": list(text.encode())}] * self.logprobs
        return [entry]

    def messages(self) -> Iterator[tuple[dict[str, Any], list | None]]:
        """(message, logprobs) of each streamed chunk before the final one."""
        for text in self.thinking:
            yield {"role": "assistant", "content": "", "thinking": text}, None
        for text in self.content:
            yield ({"role": "assistant", "content": text},
                   self._logprobs(text) if self.logprobs is not None else None)
        if self.calls:
            yield {"role": "assistant", "content": "", "tool_calls": self.calls}, None

    def whole(self) -> tuple[dict[str, Any], list | None]:
        """The message (and logprobs) of a `stream: false` answer."""
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.content)}
        if self.thinking:
            message["thinking"] = "".join(self.thinking)
        if self.calls:
            message["tool_calls"] = self.calls
        logprobs = None
        if self.logprobs is not None:
            logprobs = [entry for text in self.content for entry in self._logprobs(text)]
        return message, logprobs


# ---------------------------------------------------------------- Anthropic Messages


def anthropic_error(status: int, message: str) -> dict[str, Any]:
    kind = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
            404: "not_found_error", 429: "rate_limit_error", 503: "overloaded_error",
            }.get(status, "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def anthropic_stop_reason(done_reason: str, tool_calls: bool) -> str:
    if tool_calls:
        return "tool_use"
    return {"stop": "end_turn", "length": "max_tokens", "": ""}.get(done_reason,
                                                                      "stop_sequence")


def anthropic_tools(tools: object) -> list[tuple[str, object]]:
    return [(t.get("name", ""), t.get("input_schema")) for t in tools or []
            if isinstance(t, dict)]


def anthropic_answered_tool(messages: list) -> bool:
    last = messages[-1] if messages and isinstance(messages[-1], dict) else {}
    content = last.get("content")
    return isinstance(content, list) and any(
        isinstance(b, dict) and b.get("type") == "tool_result" for b in content)


def message_id() -> str:
    return "msg_" + os.urandom(12).hex()


def anthropic_message(msg_id: str, model: str, chunk: dict[str, Any]) -> dict[str, Any]:
    """A native final chat answer as Ollama's non-streamed Messages answer."""
    message = chunk["message"]
    content: list[dict[str, Any]] = []
    if message.get("thinking"):
        content.append({"type": "thinking", "thinking": message["thinking"]})
    if message.get("content"):
        content.append({"type": "text", "text": message["content"]})
    for call in message.get("tool_calls", []):
        content.append({"type": "tool_use", "id": call["id"],
                        "name": call["function"]["name"],
                        "input": call["function"]["arguments"]})
    out: dict[str, Any] = {"id": msg_id, "type": "message", "role": "assistant",
                           "model": model, "content": content}
    stop = anthropic_stop_reason(chunk.get("done_reason", ""),
                                 bool(message.get("tool_calls")))
    if stop:
        out["stop_reason"] = stop
    out["usage"] = {"input_tokens": chunk.get("prompt_eval_count", 0),
                    "output_tokens": chunk.get("eval_count", 0)}
    return out


class AnthropicStream:
    """Native chat chunks in, Anthropic SSE events out, block by block as Ollama does:
    message_start, then per block content_block_start / _delta / _stop (thinking, text,
    tool_use), then message_delta with the usage and message_stop. No ping events."""

    def __init__(self, msg_id: str, model: str, estimated_input: int) -> None:
        self.id, self.model, self.estimated = msg_id, model, estimated_input
        self.first = True
        self.index = 0
        self.thinking_started = self.thinking_done = self.text_started = False
        self.tools_sent = 0

    def _stop(self) -> tuple[str, dict[str, Any]]:
        return "content_block_stop", {"type": "content_block_stop", "index": self.index}

    def _start(self, block: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return "content_block_start", {"type": "content_block_start", "index": self.index,
                                       "content_block": block}

    def _delta(self, delta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return "content_block_delta", {"type": "content_block_delta", "index": self.index,
                                       "delta": delta}

    def process(self, chunk: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
        message = chunk.get("message", {})
        if self.first:
            self.first = False
            yield "message_start", {"type": "message_start", "message": {
                "id": self.id, "type": "message", "role": "assistant", "model": self.model,
                "content": [], "usage": {"input_tokens": chunk.get("prompt_eval_count")
                                         or self.estimated, "output_tokens": 0}}}
        if message.get("thinking") and not self.thinking_done:
            if self.text_started:
                yield self._stop()
                self.index += 1
                self.text_started = False
            if not self.thinking_started:
                self.thinking_started = True
                yield self._start({"type": "thinking", "thinking": ""})
            yield self._delta({"type": "thinking_delta", "thinking": message["thinking"]})
        if message.get("content"):
            if self.thinking_started and not self.thinking_done:
                self.thinking_done = True
                yield self._stop()
                self.index += 1
            if not self.text_started:
                self.text_started = True
                yield self._start({"type": "text", "text": ""})
            yield self._delta({"type": "text_delta", "text": message["content"]})
        for call in message.get("tool_calls", []):
            if self.thinking_started and not self.thinking_done:
                self.thinking_done = True
                yield self._stop()
                self.index += 1
            if self.text_started:
                yield self._stop()
                self.index += 1
                self.text_started = False
            function = call["function"]
            yield self._start({"type": "tool_use", "id": call["id"], "name": function["name"],
                               "input": {}})
            yield self._delta({"type": "input_json_delta",
                               "partial_json": json.dumps(function["arguments"],
                                                          separators=(",", ":"))})
            yield self._stop()
            self.tools_sent += 1
            self.index += 1
        if chunk.get("done"):
            if self.text_started or (self.thinking_started and not self.thinking_done):
                yield self._stop()
            delta = {}
            stop = anthropic_stop_reason(chunk.get("done_reason", ""), self.tools_sent > 0)
            if stop:
                delta["stop_reason"] = stop
            yield "message_delta", {"type": "message_delta", "delta": delta, "usage": {
                "input_tokens": chunk.get("prompt_eval_count", 0),
                "output_tokens": chunk.get("eval_count", 0)}}
            yield "message_stop", {"type": "message_stop"}


# ---------------------------------------------------------------- OpenAI Responses


def responses_tools(tools: object) -> list[tuple[str, object]]:
    return [(t.get("name", ""), t.get("parameters")) for t in tools or []
            if isinstance(t, dict) and t.get("type", "function") == "function"]


def responses_answered_tool(items: object) -> bool:
    return (isinstance(items, list) and bool(items) and isinstance(items[-1], dict)
            and items[-1].get("type") == "function_call_output")


def responses_input_tokens(items: object) -> int:
    if isinstance(items, str):
        return max(1, len(items.split()))
    return max(1, len(items)) if isinstance(items, list) else 1


class Responses:
    """Native chat chunks in, a Responses object or its SSE events out, as Ollama does."""

    def __init__(self, model: str, request: dict[str, Any]) -> None:
        self.model, self.request = model, request
        self.id = f"resp_{random.randrange(999999)}"
        self.item_id = f"msg_{random.randrange(999999)}"
        self.sequence = 0
        self.output_index = 0
        self.text = ""
        self.text_started = False
        self.thinking = ""
        self.reasoning_id: str | None = None
        self.done_items: list[dict[str, Any]] = []
        self.tools_sent = False
        self.first = True

    def response(self, status: str, output: list, usage: dict | None) -> dict[str, Any]:
        request = self.request
        text_format = ((request.get("text") or {}).get("format")) or {"type": "text"}
        reasoning = request.get("reasoning") or {}
        return {
            "id": self.id, "object": "response", "created_at": int(time.time()),
            "completed_at": None, "status": status, "incomplete_details": None,
            "model": self.model, "previous_response_id": None,
            "instructions": request.get("instructions") or None, "output": output,
            "error": None, "tools": request.get("tools") or [], "tool_choice": "auto",
            "truncation": request.get("truncation") or "disabled",
            "parallel_tool_calls": True, "text": {"format": text_format},
            "top_p": request.get("top_p", 1.0) if request.get("top_p") is not None else 1.0,
            "presence_penalty": 0, "frequency_penalty": 0, "top_logprobs": 0,
            "temperature": request.get("temperature") if request.get("temperature")
            is not None else 1.0,
            "reasoning": ({"effort": reasoning.get("effort"), "summary": reasoning.get("summary")}
                          if reasoning.get("effort") or reasoning.get("summary") else None),
            "usage": usage, "max_output_tokens": request.get("max_output_tokens"),
            "max_tool_calls": None, "store": False,
            "background": bool(request.get("background")), "service_tier": "default",
            "metadata": {}, "safety_identifier": None, "prompt_cache_key": None}

    @staticmethod
    def usage(chunk: dict[str, Any]) -> dict[str, Any]:
        prompt, completion = chunk.get("prompt_eval_count", 0), chunk.get("eval_count", 0)
        return {"input_tokens": prompt, "output_tokens": completion,
                "total_tokens": prompt + completion,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens_details": {"reasoning_tokens": 0}}

    def whole(self, chunk: dict[str, Any]) -> dict[str, Any]:
        """The non-streamed answer from the native final chunk."""
        message = chunk["message"]
        output: list[dict[str, Any]] = []
        if message.get("thinking"):
            output.append({"id": f"rs_{self.id}", "type": "reasoning",
                           "summary": [{"type": "summary_text", "text": message["thinking"]}],
                           "encrypted_content": message["thinking"]})
        calls = message.get("tool_calls") or []
        for i, call in enumerate(calls):
            output.append(self._call_item(call, f"fc_{self.id}_{i}", "completed"))
        if not calls:
            output.append(self._message_item(message.get("content", ""), "completed"))
        out = self.response("completed", output, self.usage(chunk))
        out["completed_at"] = out["created_at"]
        return out

    def _message_item(self, text: str, status: str) -> dict[str, Any]:
        return {"id": self.item_id, "type": "message", "status": status, "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": [],
                             "logprobs": []}]}

    @staticmethod
    def _call_item(call: dict[str, Any], item_id: str, status: str) -> dict[str, Any]:
        return {"id": item_id, "type": "function_call", "status": status,
                "call_id": call["id"], "name": call["function"]["name"],
                "arguments": json.dumps(call["function"]["arguments"], separators=(",", ":"))}

    def _event(self, kind: str, **data: Any) -> tuple[str, dict[str, Any]]:
        data["type"] = kind
        data["sequence_number"] = self.sequence
        self.sequence += 1
        return kind, data

    def _finish_reasoning(self) -> Iterator[tuple[str, dict[str, Any]]]:
        if self.reasoning_id is None:
            return
        item = {"id": self.reasoning_id, "type": "reasoning",
                "summary": [{"type": "summary_text", "text": self.thinking}],
                "encrypted_content": self.thinking}
        self.done_items.append(item)
        yield self._event("response.reasoning_summary_text.done", item_id=self.reasoning_id,
                          output_index=self.output_index, summary_index=0, text=self.thinking)
        yield self._event("response.output_item.done", output_index=self.output_index,
                          item=item)
        self.reasoning_id, self.thinking = None, ""
        self.output_index += 1

    def process(self, chunk: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
        message = chunk.get("message", {})
        if self.first:
            self.first = False
            yield self._event("response.created", response=self.response("in_progress", [], None))
            yield self._event("response.in_progress",
                              response=self.response("in_progress", [], None))
        if message.get("thinking"):
            if self.reasoning_id is None:
                self.reasoning_id = f"rs_{random.randrange(999999)}"
                yield self._event("response.output_item.added", output_index=self.output_index,
                                  item={"id": self.reasoning_id, "type": "reasoning",
                                        "summary": []})
            self.thinking += message["thinking"]
            yield self._event("response.reasoning_summary_text.delta",
                              item_id=self.reasoning_id, output_index=self.output_index,
                              summary_index=0, delta=message["thinking"])
        calls = message.get("tool_calls") or []
        if calls:
            yield from self._finish_reasoning()
            for i, call in enumerate(calls):
                item_id = f"fc_{random.randrange(999999)}_{i}"
                index = self.output_index + i
                done = self._call_item(call, item_id, "completed")
                self.done_items.append(done)
                yield self._event("response.output_item.added", output_index=index,
                                  item={**done, "status": "in_progress", "arguments": ""})
                yield self._event("response.function_call_arguments.delta", item_id=item_id,
                                  output_index=index, delta=done["arguments"])
                yield self._event("response.function_call_arguments.done", item_id=item_id,
                                  output_index=index, arguments=done["arguments"])
                yield self._event("response.output_item.done", output_index=index, item=done)
            self.output_index += len(calls)
            self.tools_sent = True
        if not calls and not self.tools_sent and message.get("content"):
            yield from self._finish_reasoning()
            if not self.text_started:
                self.text_started = True
                yield self._event("response.output_item.added", output_index=self.output_index,
                                  item={"id": self.item_id, "type": "message",
                                        "status": "in_progress", "role": "assistant",
                                        "content": []})
                yield self._event("response.content_part.added", item_id=self.item_id,
                                  output_index=self.output_index, content_index=0,
                                  part={"type": "output_text", "text": "", "annotations": [],
                                        "logprobs": []})
            self.text += message["content"]
            yield self._event("response.output_text.delta", item_id=self.item_id,
                              output_index=self.output_index, content_index=0,
                              delta=message["content"], logprobs=[])
        if chunk.get("done"):
            yield from self._finish_reasoning()
            output = list(self.done_items)
            if self.text_started and not self.tools_sent:
                part = {"type": "output_text", "text": self.text, "annotations": [],
                        "logprobs": []}
                yield self._event("response.output_text.done", item_id=self.item_id,
                                  output_index=self.output_index, content_index=0,
                                  text=self.text, logprobs=[])
                yield self._event("response.content_part.done", item_id=self.item_id,
                                  output_index=self.output_index, content_index=0, part=part)
                item = self._message_item(self.text, "completed")
                yield self._event("response.output_item.done", output_index=self.output_index,
                                  item=item)
                output.append(item)
            final = self.response("completed", output, self.usage(chunk))
            final["completed_at"] = final["created_at"]
            yield self._event("response.completed", response=final)

    def error_event(self, message: str) -> tuple[str, dict[str, Any]]:
        """A stream that fails after it began: the Responses `error` event. It also carries
        the `error` object the openai SDK looks for to raise APIError mid-stream."""
        return self._event("error", code="api_error", message=message, param=None,
                           error={"message": message, "type": "api_error", "param": None,
                                  "code": None})
