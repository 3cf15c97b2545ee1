"""The top level of a large JSON request body, without parsing all of it.

Routing needs a body's `model` and the types of a few top-level fields;
`json.loads` of a 48 MB body of numbers builds a parse tree several times
the body's size just to read them. This scanner walks the top-level object,
decodes the small values and only measures the large ones (an embedding
input, base64 images): the node parses the whole body anyway.

It yields control every WINDOW bytes, so a caller on the event loop can let
other requests run between steps of a scan of a huge body.
"""
from __future__ import annotations

import asyncio
import json
import re
from typing import Any, Iterator

WINDOW = 256 * 1024
SMALL_VALUE = 64 * 1024   # raw values up to this size are decoded
MAX_DEPTH = 512           # what the parser of Ollama (Go) accepts is far less

_WS = re.compile(rb"[ \t\n\r]*")
_STRUCTURAL = (b'"', b"[", b"]", b"{", b"}")
_IN_STRING = (b'"', b"\\")
_SCALAR = re.compile(rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?|true|false|null")
_CLOSES = {ord("["): ord("]"), ord("{"): ord("}")}
_KINDS = {ord('"'): "string", ord("["): "array", ord("{"): "object"}


class Large:
    """A top-level value too large to decode: its JSON kind, raw size and
    where it starts in the body. Truthy, as only a non-empty value gets this
    large."""

    def __init__(self, kind: str, size: int, start: int = 0) -> None:
        self.kind = kind
        self.size = size
        self.start = start

    def __bool__(self) -> bool:
        return True

    def __repr__(self) -> str:
        return f"<Large {self.kind} of {self.size} bytes>"


class ScanError(ValueError):
    pass


def _first(buf: bytes, needles: tuple[bytes, ...], start: int, end: int) -> int:
    """Index of the first of `needles` in buf[start:end], or -1. bytes.find
    runs at memchr speed; a regex character class scans many times slower."""
    best = -1
    for needle in needles:
        found = buf.find(needle, start, end if best < 0 else best)
        if found >= 0:
            best = found
    return best


def _seek(buf: bytes, needles: tuple[bytes, ...], pos: int, unterminated: str) -> Iterator[int]:
    """Yields every WINDOW bytes; returns the index of the next of `needles`."""
    end = len(buf)
    while True:
        found = _first(buf, needles, pos, min(end, pos + WINDOW))
        if found >= 0:
            return found
        if pos + WINDOW >= end:
            raise ScanError(unterminated)
        pos += WINDOW
        yield pos


def _string_end(buf: bytes, start: int) -> Iterator[int]:
    """Yields while scanning; returns the index after the closing quote."""
    pos = start + 1
    while True:
        found = yield from _seek(buf, _IN_STRING, pos, "unterminated string")
        if buf[found] == ord("\\"):
            pos = found + 2
            continue
        return found + 1


def _container_end(buf: bytes, start: int) -> Iterator[int]:
    """Matching brackets (strings skipped); returns the index after it."""
    stack = [_CLOSES[buf[start]]]
    pos = start + 1
    while stack:
        found = yield from _seek(buf, _STRUCTURAL, pos, "unterminated array or object")
        char = buf[found]
        if char == ord('"'):
            pos = yield from _string_end(buf, found)
        elif char in _CLOSES:
            if len(stack) >= MAX_DEPTH:
                raise ScanError("nested too deeply")
            stack.append(_CLOSES[char])
            pos = found + 1
        elif char == stack[-1]:
            stack.pop()
            pos = found + 1
        else:
            raise ScanError("mismatched brackets")
    return pos


def _value_end(buf: bytes, start: int) -> Iterator[int]:
    char = buf[start] if start < len(buf) else -1
    if char == ord('"'):
        return (yield from _string_end(buf, start))
    if char in _CLOSES:
        return (yield from _container_end(buf, start))
    match = _SCALAR.match(buf, start)
    if match is None:
        raise ScanError(f"unexpected character at {start}")
    return match.end()


def _skip_ws(buf: bytes, pos: int) -> int:
    return _WS.match(buf, pos).end()


def scan(buf: bytes) -> Iterator[int]:
    """A generator: iterate it to let time pass; its return value (the
    StopIteration's) is the top-level object, large values as Large."""
    pos = _skip_ws(buf, 0)
    if pos >= len(buf) or buf[pos] != ord("{"):
        raise ScanError("request body must be a JSON object")
    out: dict[str, Any] = {}
    pos = _skip_ws(buf, pos + 1)
    if pos < len(buf) and buf[pos] == ord("}"):
        pos += 1
    else:
        while True:
            if pos >= len(buf) or buf[pos] != ord('"'):
                raise ScanError(f"expected a member name at {pos}")
            key_end = yield from _string_end(buf, pos)
            key = json.loads(buf[pos:key_end])
            pos = _skip_ws(buf, key_end)
            if pos >= len(buf) or buf[pos] != ord(":"):
                raise ScanError(f"expected ':' at {pos}")
            start = _skip_ws(buf, pos + 1)
            value_end = yield from _value_end(buf, start)
            size = value_end - start
            out[key] = (json.loads(buf[start:value_end]) if size <= SMALL_VALUE
                        else Large(_KINDS.get(buf[start], "number"), size, start))
            pos = _skip_ws(buf, value_end)
            yield pos
            if pos < len(buf) and buf[pos] == ord(","):
                pos = _skip_ws(buf, pos + 1)
                continue
            if pos < len(buf) and buf[pos] == ord("}"):
                pos += 1
                break
            raise ScanError(f"expected ',' or '}}' at {pos}")
    if _skip_ws(buf, pos) != len(buf):
        raise ScanError("data after the JSON object")
    return out


_PENDING = object()


def _step(steps: Iterator[int]) -> Any:
    """One step of a scan: its result once done, else _PENDING."""
    try:
        next(steps)
    except StopIteration as done:
        return done.value
    return _PENDING


def scan_all(buf: bytes) -> dict[str, Any]:
    """The whole scan at once."""
    steps = scan(buf)
    while (out := _step(steps)) is _PENDING:
        pass
    return out


async def scan_yielding(buf: bytes) -> dict[str, Any]:
    """The scan, letting the event loop run other work between its steps."""
    steps = scan(buf)
    while (out := _step(steps)) is _PENDING:
        await asyncio.sleep(0)
    return out
