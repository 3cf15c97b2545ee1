"""Key changes told through the cluster's channel: a key created, edited or
revoked, or the inference access mode changed, through one instance is
applied by every other one from the store (the truth), within a second."""
from __future__ import annotations

from typing import Any

from .. import store

KINDS = ("key", "inference_auth")


async def apply(keys: Any, kind: str, key_id: Any) -> bool:
    """Apply one change to `keys` (a KeyService); False when not a key change."""
    if kind == "key" and isinstance(key_id, int):
        row = await store.run(store.ApiKey.get_or_none, store.ApiKey.id == key_id)
        keys.keyring.apply_stored(key_id, row)
    elif kind == "inference_auth":
        keys.mode_applied(await store.run(store.get_config, "inference_auth", "open"))
    else:
        return False
    return True


async def reload_all(keys: Any) -> None:
    """Every key and the mode anew, after changes may have been missed."""
    rows = await store.run(lambda: list(store.ApiKey.select()))
    mode = await store.run(store.get_config, "inference_auth", "open")
    keys.keyring.replace(rows)
    keys.mode_applied(mode)
