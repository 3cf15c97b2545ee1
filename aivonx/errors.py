"""Error shapes, one per client dialect, shared by the relay and the handlers.

A client only understands errors in the shape of the API it speaks:
Ollama's `{"error": "..."}`, OpenAI's `{"error": {"message": ...}}` (also on
the Responses API), Anthropic's `{"type": "error", "error": {...}}`; the
management API uses Ollama's. Proxy-made errors and the final chunk of a
broken stream are built here so every path answers alike.
"""
from __future__ import annotations

import errno
import json


class ApiError(Exception):
    """An error answered to the client, in its dialect, with its status."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def _openai_type(status: int) -> str:
    return {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")


def _openai_error(message: str, status: int) -> dict:
    return {"error": {"message": message, "type": _openai_type(status),
                      "param": None, "code": None}}


def _anthropic_error(message: str, status: int) -> dict:
    kind = {400: "invalid_request_error", 401: "authentication_error",
            403: "permission_error", 404: "not_found_error", 413: "request_too_large",
            429: "rate_limit_error", 503: "overloaded_error"}.get(status, "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def error_body(style: str, message: str, status: int) -> bytes:
    """An error in the client's dialect: Ollama's, OpenAI's (also for the
    Responses API) or Anthropic's."""
    if style in ("openai", "responses"):
        return json.dumps(_openai_error(message, status)).encode()
    if style == "anthropic":
        return json.dumps(_anthropic_error(message, status)).encode()
    return json.dumps({"error": message}).encode()


def stream_error_chunk(content_type: str, message: str, style: str = "ollama") -> bytes | None:
    """The final chunk that tells a streaming client its stream broke, in the
    stream's own framing; None where the framing has no room for one.

    Anthropic's stream ends with an `error` event; the Responses API's with
    an `error` event that also carries the `error` object the openai SDK
    raises from; chat completions with a `data:` error object."""
    ctype = content_type.split(";", 1)[0].strip().lower()
    if ctype == "application/x-ndjson":
        return json.dumps({"error": message}).encode() + b"\n"
    if ctype != "text/event-stream":
        return None
    if style == "anthropic":
        return b"event: error\ndata: " + json.dumps(_anthropic_error(message, 500)).encode() \
            + b"\n\n"
    payload = _openai_error(message, 500)
    if style == "responses":
        payload = {"type": "error", "code": "api_error", "message": message, "param": None,
                   **payload}
        return b"event: error\ndata: " + json.dumps(payload).encode() + b"\n\n"
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def out_of_descriptors(error: object) -> bool:
    """The proxy itself ran out of file descriptors: nobody else's fault."""
    return isinstance(error, OSError) and error.errno in (errno.EMFILE, errno.ENFILE)
