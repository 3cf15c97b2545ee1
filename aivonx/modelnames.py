"""Model names exactly as Ollama decides that two names mean "the same model".

The proxy routes a request to a node that has the requested model, so it must
agree with Ollama on equivalence: ``llama3``, ``LLaMA3:latest`` and
``registry.ollama.ai/library/llama3`` are one model, ``llama3:8b`` is another,
and ``myhost:5000/ns/m`` has no tag (the colon belongs to the host).

This mirrors Ollama's ``modelref.ParseRef`` (trim, ``:cloud``/``:local``
source suffix) and ``types/model`` ``ParseName`` / ``isValidPart`` /
``DisplayShortest`` (see section 2 of the shared Ollama API notes). The
routing key lower-cases every part because Ollama compares parts with
``strings.EqualFold``.
"""
from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import NamedTuple

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"

# Names longer than this are rejected before any parsing. It bounds the work
# done on untrusted input and the size of every key in the canonical() cache.
MAX_NAME_LEN = 512

# Go's strings.TrimSpace set (unicode.IsSpace). Python's str.strip() would also
# drop \x1c-\x1f, which Ollama keeps (and then rejects as invalid characters).
_GO_SPACE = ("\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005"
             "\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")

# isValidPart: ASCII only, first character alphanumeric or "_", then per-part
# characters and byte lengths. Explicit classes, so no Unicode digits/letters.
_HOST = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,349}")
_NAMESPACE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,79}")
_MODEL_OR_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}")


class InvalidModelName(ValueError):
    """The name is empty or not a name Ollama would accept."""


class _Name(NamedTuple):
    """A parsed name with defaults filled in, original casing kept."""

    host: str
    namespace: str
    model: str
    tag: str


def _strip_source_suffix(text: str) -> tuple[str, bool]:
    """Ollama's parseSourceSuffix: drop a final ``:cloud``/``:local`` (any case),
    or turn a ``:<tag>-cloud`` tag into ``:<tag>``. Returns (base, explicit)."""
    idx = text.rfind(":")
    if idx < 0:
        return text, False
    suffix_raw = text[idx + 1:].strip(_GO_SPACE)
    suffix = suffix_raw.lower()
    if suffix in ("cloud", "local"):
        return text[:idx], True
    if "/" not in suffix_raw and suffix.endswith("-cloud"):
        return text[:idx + 1] + suffix_raw[:-len("-cloud")], True
    return text, False


def _parse(name: str) -> _Name:
    """Parse and validate ``name`` like Ollama's ParseRef + ParseName."""
    if not isinstance(name, str):
        raise InvalidModelName("model name must be a string")
    if len(name) > MAX_NAME_LEN:
        raise InvalidModelName("invalid model name: too long")
    text = name.strip(_GO_SPACE)
    if not text:
        raise InvalidModelName("model is required")

    base, explicit = _strip_source_suffix(text)
    if explicit and _strip_source_suffix(base)[1]:
        raise InvalidModelName(
            f"use either :local or :cloud, not both: {json.dumps(text)}")

    # "/" cannot occur in a tag, so only a colon after the last "/" starts one;
    # a colon before it is a host port ("host:5000/ns/model").
    tag = DEFAULT_TAG
    if base.rfind(":") > base.rfind("/"):
        base, _, tag = base.rpartition(":")

    # Split from the right; anything left of the namespace is the host, which
    # may carry a scheme ("https://host/ns/model"). A leftover "/" in the host
    # (four or more parts) fails the host check below.
    host, namespace = DEFAULT_HOST, DEFAULT_NAMESPACE
    parts = base.rsplit("/", 2)
    model = parts[-1]
    if len(parts) >= 2:
        namespace = parts[-2]
    if len(parts) == 3:
        host = parts[0]
        if "://" in host:
            host = host.split("://", 1)[1]

    if not (_HOST.fullmatch(host) and _NAMESPACE.fullmatch(namespace)
            and _MODEL_OR_TAG.fullmatch(model) and _MODEL_OR_TAG.fullmatch(tag)):
        raise InvalidModelName("invalid model name")
    return _Name(host, namespace, model, tag)


@lru_cache(maxsize=4096)
def _canonical(name: str) -> str:
    # Only successful results are cached and canonical() has already rejected
    # non-strings and names over MAX_NAME_LEN, so keys stay small.
    n = _parse(name)
    return f"{n.host}/{n.namespace}/{n.model}:{n.tag}".lower()


def canonical(name: str) -> str:
    """Return the routing key host/namespace/model:tag, all lower-case.

    Two names get the same key exactly when Ollama treats them as the same
    model. Raises InvalidModelName for empty/invalid names. Cached, because it
    runs on every proxied request.
    """
    if not isinstance(name, str):
        raise InvalidModelName("model name must be a string")
    if len(name) > MAX_NAME_LEN:
        raise InvalidModelName("invalid model name: too long")
    return _canonical(name)


def namespace(name: str) -> str:
    """The namespace part (e.g. 'library'), used as OpenAI's owned_by.

    Casing is kept, as Ollama reports ParseName(name).Namespace.
    """
    return _parse(name).namespace
