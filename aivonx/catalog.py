"""What clients list, merged across nodes: tags, loaded models, versions.

Pure functions over the answers the nodes gave, so the merge rules are
tested without HTTP.
"""
from __future__ import annotations

import datetime
import re
from typing import Any, Iterable

from . import modelnames

_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
_FRACTION = re.compile(r"(\.\d{6})\d+")


def parse_time(value: Any) -> datetime.datetime:
    """An RFC 3339 timestamp as Ollama writes it (nanoseconds, offset);
    anything unreadable sorts as the oldest."""
    if not isinstance(value, str):
        return _EPOCH
    text = _FRACTION.sub(r"\1", value.strip()).replace("Z", "+00:00")
    try:
        parsed = datetime.datetime.fromisoformat(text)
    except ValueError:
        return _EPOCH
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=datetime.timezone.utc)
    return parsed


def _key(entry: dict[str, Any]) -> str | None:
    try:
        return modelnames.canonical(entry.get("model") or entry.get("name") or "")
    except modelnames.InvalidModelName:
        return None


def merge_tags(lists: Iterable[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One entry per model (canonical name); the newest `modified_at` wins."""
    best: dict[str, dict[str, Any]] = {}
    for entries in lists:
        for entry in entries:
            key = _key(entry)
            if key is None:
                continue
            kept = best.get(key)
            if kept is None or parse_time(entry.get("modified_at")) > parse_time(
                    kept.get("modified_at")):
                best[key] = entry
    return sorted(best.values(), key=lambda e: parse_time(e.get("modified_at")), reverse=True)


def merge_ps(lists: Iterable[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Every loaded copy on every node (each holds memory of its own), the
    longest remaining first, as Ollama sorts them."""
    merged = [entry for entries in lists for entry in entries]
    return sorted(merged, key=lambda e: parse_time(e.get("expires_at")), reverse=True)


def _version_tuple(version: str) -> tuple[int, ...] | None:
    match = re.match(r"^v?(\d+)\.(\d+)\.(\d+)", version.strip())
    return tuple(int(p) for p in match.groups()) if match else None


def lowest_version(versions: Iterable[str | None]) -> str:
    """The oldest node's version: what every node can do. Ollama source
    builds report 0.0.0, which clients parse."""
    parsed = [(t, v) for v in versions if v for t in [_version_tuple(v)] if t is not None]
    if not parsed:
        return "0.0.0"
    return min(parsed)[1]


def openai_model(entry: dict[str, Any], model_id: str | None = None) -> dict[str, Any]:
    name = entry.get("model") or entry.get("name")
    return {
        "id": model_id or name,
        "object": "model",
        "created": int(parse_time(entry.get("modified_at")).timestamp()),
        "owned_by": modelnames.namespace(name),
    }


def openai_model_list(tags: list[dict[str, Any]]) -> dict[str, Any]:
    """Ollama answers `data: null` when it has no model; clients cope."""
    data = [openai_model(e) for e in tags if _key(e) is not None]
    return {"object": "list", "data": data or None}


def index_tags(tags: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Merged entries by canonical name, to find one without a scan."""
    return {key: entry for entry in tags for key in [_key(entry)] if key is not None}
