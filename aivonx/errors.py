"""Error shapes, one per client dialect, shared by the relay and the handlers.

A client only understands errors in the shape of the API it speaks:
Ollama's `{"error": "..."}`, OpenAI's `{"error": {"message": ...}}`; the
management API uses Ollama's. Proxy-made errors and the final chunk of a
broken stream are built here so every path answers alike.
"""
from __future__ import annotations

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


def error_body(style: str, message: str, status: int) -> bytes:
    """An error in the client's dialect: Ollama's or OpenAI's."""
    if style == "openai":
        return json.dumps({"error": {"message": message, "type": _openai_type(status),
                                     "param": None, "code": None}}).encode()
    return json.dumps({"error": message}).encode()


def stream_error_chunk(content_type: str, message: str) -> bytes | None:
    """The final chunk that tells a streaming client its stream broke, in the
    stream's own framing; None where the framing has no room for one."""
    ctype = content_type.split(";", 1)[0].strip().lower()
    if ctype == "application/x-ndjson":
        return json.dumps({"error": message}).encode() + b"\n"
    if ctype == "text/event-stream":
        payload = {"error": {"message": message, "type": "api_error",
                             "param": None, "code": None}}
        return b"data: " + json.dumps(payload).encode() + b"\n\n"
    return None
