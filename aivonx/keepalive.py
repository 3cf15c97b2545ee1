"""How long nodes keep a model loaded, as the admin decides.

A shared cluster's memory is the admins' to plan: one client sending
`keep_alive: 0` (or "1m") on every request makes the nodes unload and load
the model again and again. The policy gives each model a keep_alive (a
default, and overrides per model, e.g. embeddings always resident), applied
to requests that do not set one, or to every request when `enforce` is on.

The relayed body is not parsed again to apply it: the value is appended as
a last member of the body's JSON object, and Ollama (Go's encoding/json),
like most JSON readers, takes the last of duplicate members.
"""
from __future__ import annotations

import json
import re
from typing import Any

from . import modelnames

# Go's time.ParseDuration grammar, as Ollama reads keep_alive strings.
_DURATION = re.compile(r"-?(?:0|(?:(?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|ms|s|m|h))+)")
MAX_OVERRIDES = 500


class PolicyError(ValueError):
    """What is wrong, by field (the management API's `fields`)."""

    def __init__(self, errors: dict[str, str]) -> None:
        super().__init__("; ".join(f"{k}: {v}" for k, v in errors.items()))
        self.errors = errors


def check_duration(value: Any) -> str | int | float:
    """A keep_alive as Ollama takes it: seconds as a number (negative: for
    ever) or a duration string such as "5m", "1h30m", "-1m"."""
    if isinstance(value, bool) or value is None:
        raise ValueError("must be a number of seconds or a duration such as \"5m\"")
    if isinstance(value, (int, float)):
        if value != value or abs(value) > 10 ** 12:
            raise ValueError("must be a finite number of seconds")
        return value
    if isinstance(value, str) and len(value) <= 40:
        text = value.strip()
        if re.fullmatch(r"-?\d+", text):
            return int(text)  # a plain number of seconds, as OLLAMA_KEEP_ALIVE takes it
        if _DURATION.fullmatch(text):
            return text
    raise ValueError("must be a number of seconds or a duration such as \"5m\", \"24h\" or "
                     "\"-1m\" (for ever)")


class KeepAlivePolicy:
    def __init__(self) -> None:
        self.default: str | int | float | None = None
        self.models: dict[str, tuple[str, str | int | float]] = {}  # key -> (name, value)
        self.enforce = False

    def as_dict(self) -> dict[str, Any]:
        return {"default": self.default, "enforce": self.enforce,
                "models": {name: value for name, value in self.models.values()}}

    def update(self, data: Any, partial: bool = True) -> None:
        """Apply a `keep_alive` object from the config API (all or nothing).
        A PATCH keeps what it does not name; `models` is replaced whole."""
        if not isinstance(data, dict):
            raise PolicyError({"keep_alive": "must be an object with default, models, enforce"})
        errors: dict[str, str] = {}
        unknown = set(data) - {"default", "models", "enforce"}
        if unknown:
            errors["keep_alive"] = f"unknown field(s): {', '.join(sorted(unknown))[:200]}"
        default, models, enforce = self.default, self.models, self.enforce
        if "default" in data or not partial:
            try:
                default = None if data.get("default") is None else check_duration(data["default"])
            except ValueError as exc:
                errors["keep_alive.default"] = str(exc)
        if "enforce" in data or not partial:
            enforce = data.get("enforce", False)
            if not isinstance(enforce, bool):
                errors["keep_alive.enforce"] = "must be true or false"
        if "models" in data or not partial:
            models = {}
            given = data.get("models") or {}
            if not isinstance(given, dict) or len(given) > MAX_OVERRIDES:
                errors["keep_alive.models"] = (f"must be an object of at most {MAX_OVERRIDES} "
                                               "model names and durations")
                given = {}
            for name, value in given.items():
                try:
                    models[modelnames.canonical(name)] = (name, check_duration(value))
                except modelnames.InvalidModelName as exc:
                    errors[f"keep_alive.models.{name[:100]}"] = f"invalid model name: {exc}"
                except ValueError as exc:
                    errors[f"keep_alive.models.{name[:100]}"] = str(exc)
        if errors:
            raise PolicyError(errors)
        self.default, self.models, self.enforce = default, models, enforce

    def load(self, data: Any) -> None:
        """The stored policy at start; a bad one (edited by hand) is ignored."""
        try:
            self.update(data or {}, partial=False)
        except PolicyError:
            pass

    def value_for(self, key: str) -> str | int | float | None:
        override = self.models.get(key)
        return override[1] if override is not None else self.default

    def apply(self, key: str, body: dict[str, Any], raw: bytes) -> bytes | None:
        """The body to relay instead of `raw`, or None to relay it as it is."""
        value = self.value_for(key)
        if value is None or ("keep_alive" in body and not self.enforce):
            return None
        end = raw.rstrip().rfind(b"}")
        if end < 0:
            return None
        member = b'"keep_alive":' + json.dumps(value).encode()
        empty = not raw[raw.find(b"{") + 1:end].strip()
        body["keep_alive"] = value
        return raw[:end] + (member if empty else b"," + member) + raw[end:]
