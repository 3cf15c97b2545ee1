"""Long-lived keys: creation, validation, lookup in microseconds.

A key is `avx_` and 43 random URL-safe characters (256 bits). Only its
SHA-256 is stored: with that much entropy a fast hash is as safe as a slow
password hash, and a check costs one SHA-256 and one dict lookup instead of
a 50 ms scrypt per request. Every key lives in memory (the table is small),
so a request never reads the database; a change through the API updates
the memory in the same call, so a revocation or an expiry takes effect at
the next request.
"""
from __future__ import annotations

import datetime
import fnmatch
import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .. import modelnames, store
from ..nodes import ValidationError

KEY_PREFIX = "avx_"
KINDS = ("inference", "admin")
MAX_KEY = 200
MAX_MODELS = 100
MAX_LIMIT = 10 ** 15
MAX_PRIORITY = 100
MODEL_PATTERN = re.compile(r"[A-Za-z0-9._:/*?\[\]-]{1,200}")
LIBRARY = "registry.ollama.ai/library/"
LIMIT_FIELDS = ("rpm", "max_concurrent", "daily_tokens", "monthly_tokens")
EDITABLE = ("name", "models", *LIMIT_FIELDS, "priority", "expires_at")


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _epoch(moment: datetime.datetime | None) -> float | None:
    if moment is None:
        return None
    return moment.replace(tzinfo=datetime.timezone.utc).timestamp()


def iso(moment: datetime.datetime | float | None) -> str | None:
    if moment is None:
        return None
    if isinstance(moment, float):
        moment = datetime.datetime.fromtimestamp(moment, datetime.timezone.utc)
    else:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(eq=False)
class Key:
    """A key as requests see it: what it may do and its limits."""
    id: int
    name: str
    kind: str = "inference"
    key_hash: str = ""
    models: tuple[str, ...] = ()
    rpm: int | None = None
    max_concurrent: int | None = None
    daily_tokens: int | None = None
    monthly_tokens: int | None = None
    priority: int = 1
    expires_at: float | None = None
    revoked: bool = False
    user_id: int | None = None
    last_used: float | None = None
    used_since_flush: bool = False
    _allowed: dict[str, bool] = field(default_factory=dict)

    def valid(self, now: float) -> bool:
        return not self.revoked and (self.expires_at is None or now < self.expires_at)

    def allows(self, model_key: str) -> bool:
        """Whether the key may use the model with this routing key (names
        match as Ollama's rules say, globs against the short name)."""
        if not self.models:
            return True
        known = self._allowed.get(model_key)
        if known is None:
            known = any(_matches(p, model_key) for p in self.models)
            if len(self._allowed) > 1000:
                self._allowed.clear()
            self._allowed[model_key] = known
        return known


ANONYMOUS = Key(id=0, name="anonymous")


def _matches(pattern: str, model_key: str) -> bool:
    short = model_key[len(LIBRARY):] if model_key.startswith(LIBRARY) else model_key
    pattern = pattern.lower()
    if not any(c in pattern for c in "*?["):
        try:
            return modelnames.canonical(pattern) == model_key
        except modelnames.InvalidModelName:
            return False
    return fnmatch.fnmatchcase(short, pattern) or fnmatch.fnmatchcase(model_key, pattern)


# -- validation ---------------------------------------------------------------------

def _limit(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_LIMIT:
        raise ValidationError({name: f"must be null or an integer between 1 and {MAX_LIMIT}"})
    return value


def _expiry(value: Any) -> datetime.datetime | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 40:
        raise ValidationError({"expires_at": "must be null or an ISO 8601 date and time"})
    try:
        moment = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValidationError({"expires_at": "must be null or an ISO 8601 date and time"}) \
            from None
    if moment.tzinfo is not None:
        moment = moment.astimezone(datetime.timezone.utc).replace(tzinfo=None)
    if moment <= store.utcnow():
        raise ValidationError({"expires_at": "must be in the future"})
    return moment


def _clean(data: Any, creating: bool) -> dict[str, Any]:
    """The stored fields from a request body; ValidationError naming each
    wrong field."""
    if not isinstance(data, dict):
        raise ValidationError({"non_field_errors": "expected a JSON object"})
    errors: dict[str, str] = {}
    out: dict[str, Any] = {}
    allowed = set(EDITABLE) | ({"kind"} if creating else set())
    for name in data:
        if name not in allowed:
            errors[name] = ("cannot be changed" if name == "kind" else "unknown field")
    if creating or "name" in data:
        name = data.get("name")
        if not isinstance(name, str) or not name.strip() or len(name) > 100:
            errors["name"] = "must be a string of 1-100 characters"
        else:
            out["name"] = name.strip()
    if creating:
        kind = data.get("kind", "inference")
        if kind not in KINDS:
            errors["kind"] = f"must be one of: {', '.join(KINDS)}"
        else:
            out["kind"] = kind
    if "models" in data:
        models = data["models"]
        if models is None:
            models = []
        if (not isinstance(models, list) or len(models) > MAX_MODELS
                or not all(isinstance(m, str) and MODEL_PATTERN.fullmatch(m) for m in models)):
            errors["models"] = (f"must be a list of at most {MAX_MODELS} model names or "
                                "globs such as llama3*")
        else:
            out["models_json"] = json.dumps(models)
    for name in LIMIT_FIELDS:
        if name in data:
            try:
                out[name] = _limit(data[name], name)
            except ValidationError as exc:
                errors.update(exc.errors)
    if "priority" in data:
        priority = data["priority"]
        if isinstance(priority, bool) or not isinstance(priority, int) \
                or not 1 <= priority <= MAX_PRIORITY:
            errors["priority"] = f"must be an integer between 1 and {MAX_PRIORITY}"
        else:
            out["priority"] = priority
    if "expires_at" in data:
        try:
            out["expires_at"] = _expiry(data["expires_at"])
        except ValidationError as exc:
            errors.update(exc.errors)
    if errors:
        raise ValidationError(errors)
    return out


def _models(row: store.ApiKey) -> tuple[str, ...]:
    try:
        value = json.loads(row.models_json or "[]")
    except ValueError:
        return ()
    return tuple(m for m in value if isinstance(m, str)) if isinstance(value, list) else ()


def _from_row(row: store.ApiKey) -> Key:
    return Key(id=row.id, name=row.name, kind=row.kind, key_hash=row.key_hash,
               models=_models(row), rpm=row.rpm, max_concurrent=row.max_concurrent,
               daily_tokens=row.daily_tokens, monthly_tokens=row.monthly_tokens,
               priority=row.priority or 1, expires_at=_epoch(row.expires_at),
               revoked=row.revoked_at is not None, user_id=row.user_id,
               last_used=_epoch(row.last_used_at))


class Keyring:
    """Every key, in memory, by hash and by id; the store behind it."""

    def __init__(self) -> None:
        self.by_hash: dict[str, Key] = {}
        self.by_id: dict[int, Key] = {0: ANONYMOUS}
        # Told ("key", id) after each stored change, for the other instances.
        self.on_change: Callable[[str, int | None], None] = lambda kind, key_id: None

    def load(self) -> None:
        self.replace(list(store.ApiKey.select()))

    def replace(self, rows: list[store.ApiKey]) -> None:
        """Every key anew from the store's rows (when each was last used is
        kept from memory when later)."""
        before = self.by_id
        self.by_hash.clear()
        self.by_id = {0: ANONYMOUS}
        for row in rows:
            key = _from_row(row)
            old = before.get(key.id)
            if old is not None:
                key.last_used = max(filter(None, (key.last_used, old.last_used)), default=None)
            self._remember(key)

    def apply_stored(self, key_id: int, row: store.ApiKey | None) -> None:
        """Another instance changed this key: its stored row, None when gone."""
        if row is not None:
            self._remember(_from_row(row))
            return
        old = self.by_id.pop(key_id, None)
        if old is not None and key_id:
            self.by_hash.pop(old.key_hash, None)

    def _remember(self, key: Key) -> None:
        old = self.by_id.get(key.id)
        if old is not None:
            self.by_hash.pop(old.key_hash, None)
            key.last_used = max(filter(None, (key.last_used, old.last_used)), default=None)
        self.by_id[key.id] = key
        if not key.revoked:
            self.by_hash[key.key_hash] = key

    def check(self, token: str | None, now: float | None = None) -> Key | None:
        """The valid key `token` is, else None (unknown, revoked, expired).
        The lookup is by SHA-256 of the token: its timing says nothing
        about any stored key."""
        if not token or len(token) > MAX_KEY or not token.startswith(KEY_PREFIX):
            return None
        digest = key_hash(token)
        key = self.by_hash.get(digest)
        if key is None or not hmac.compare_digest(key.key_hash, digest):
            return None
        return key if key.valid(time.time() if now is None else now) else None

    def touch(self, key: Key, now: float) -> None:
        key.last_used = now
        key.used_since_flush = True

    # -- changes (admin API) ----------------------------------------------------------
    def create(self, data: Any, user: store.User | None) -> tuple[store.ApiKey, str]:
        """A new key from a request body; returns its row and the key itself,
        which exists nowhere else afterwards."""
        fields = _clean(data, creating=True)
        token = KEY_PREFIX + secrets.token_urlsafe(32)
        row = store.ApiKey.create(key_hash=key_hash(token), prefix=token[:12],
                                  user=user if isinstance(user, store.User) else None,
                                  **fields)
        self._remember(_from_row(row))
        self.on_change("key", row.id)
        return row, token

    def get(self, key_id: int) -> store.ApiKey:
        row = store.ApiKey.get_or_none(store.ApiKey.id == key_id)
        if row is None:
            raise LookupError(key_id)
        return row

    def update(self, key_id: int, data: Any) -> store.ApiKey:
        row = self.get(key_id)
        fields = _clean(data, creating=False)
        if fields:
            store.ApiKey.update(**fields).where(store.ApiKey.id == key_id).execute()
            row = self.get(key_id)
            self._remember(_from_row(row))
            self.on_change("key", key_id)
        return row

    def revoke(self, key_id: int) -> store.ApiKey:
        row = self.get(key_id)
        if row.revoked_at is None:
            store.ApiKey.update(revoked_at=store.utcnow()).where(
                store.ApiKey.id == key_id).execute()
            row = self.get(key_id)
            self.on_change("key", key_id)
        self._remember(_from_row(row))
        return row

    def used_keys(self) -> list[Key]:
        """Keys used since the last call, for the batched write of last use."""
        used = [k for k in self.by_id.values() if k.used_since_flush and k.id]
        for key in used:
            key.used_since_flush = False
        return used

    def key_dict(self, row: store.ApiKey) -> dict[str, Any]:
        live = self.by_id.get(row.id)
        last_used = live.last_used if live is not None else _epoch(row.last_used_at)
        return {"id": row.id, "name": row.name, "kind": row.kind, "prefix": row.prefix,
                "models": list(_models(row)), "rpm": row.rpm,
                "max_concurrent": row.max_concurrent, "daily_tokens": row.daily_tokens,
                "monthly_tokens": row.monthly_tokens, "priority": row.priority,
                "expires_at": iso(row.expires_at), "created_at": iso(row.created_at),
                "last_used_at": iso(last_used), "revoked": row.revoked_at is not None,
                "revoked_at": iso(row.revoked_at)}
