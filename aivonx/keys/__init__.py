"""Keys and what they use: one key table for inference and admin keys, one
check, per-key limits, usage accounting and the audit log.

`KeyService` (on `ctx.keys`) is what handlers talk to: `identify` finds the
key a request carries (401 when `inference_auth` is "keys" and there is
none), `admit` applies its model allow-list and limits (403, 429),
`finish` counts what the request used. Nothing here touches the database
per request: the batch is written by `flush`, a few times a second.
"""
from __future__ import annotations

import datetime
import ipaddress
import logging
import time
from typing import Any, Callable

import peewee
from tornado.ioloop import PeriodicCallback

from .. import store
from ..errors import ApiError
from ..metrics import Metrics
from ..nodes import ValidationError
from .audit import AuditLog
from .keyring import ANONYMOUS, Key, Keyring
from .limits import LimitExceeded, Limits, limited, utc_month
from .meter import Meter
from .usage import UsageBook

log = logging.getLogger("aivonx.keys")


def is_loopback_host(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # "" (every address) or a name

MODES = ("open", "keys")
FLUSH_INTERVAL = 0.5  # seconds: at most two writes a second
UNKNOWN_MODEL = "(unknown)"

__all__ = ["ANONYMOUS", "Key", "KeyService", "Meter", "MODES", "UNKNOWN_MODEL"]


class KeyService:
    def __init__(self, metrics: Metrics | None = None) -> None:
        self.keyring = Keyring()
        self.limits = Limits()
        self.usage = UsageBook()
        self.audit = AuditLog()
        self.metrics = metrics if metrics is not None else Metrics()
        self.mode = "open"
        self.host = "127.0.0.1"  # where the server listens, for warn_if_exposed
        # With --redis: the limits counted cluster-wide (aivonx.cluster.keylimits).
        self.shared: Any = None
        self._timer: PeriodicCallback | None = None

    @property
    def on_change(self) -> Callable[[str, int | None], None]:
        """Told ("key", id) or ("inference_auth", None) after a stored change."""
        return self.keyring.on_change

    @on_change.setter
    def on_change(self, callback: Callable[[str, int | None], None]) -> None:
        self.keyring.on_change = callback

    # -- life cycle ---------------------------------------------------------------
    def load(self) -> None:
        """Keys, the access mode and this day's and month's token totals."""
        self.keyring.load()
        mode = store.get_config("inference_auth", "open")
        self.mode = mode if mode in MODES else "open"
        self.seed_limits(*self.usage_totals())

    def usage_totals(self) -> tuple[dict[int, int], dict[int, int], float]:
        """Tokens used this UTC day and month per key, from the usage table
        (a store read: in the store's threads off the event loop)."""
        now = time.time()
        today = datetime.datetime.fromtimestamp(now // 86400 * 86400, datetime.timezone.utc)
        year, month = utc_month(now)
        month_start = datetime.datetime(year, month, 1)
        return (self.usage.tokens_since(today.replace(tzinfo=None)),
                self.usage.tokens_since(month_start), now)

    def seed_limits(self, days: dict[int, int], months: dict[int, int], now: float) -> None:
        for key_id in set(days) | set(months):
            self.limits.seed(key_id, days.get(key_id, 0), months.get(key_id, 0), now)

    def start(self) -> None:
        self._timer = PeriodicCallback(self.flush, FLUSH_INTERVAL * 1000)
        self._timer.start()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.stop()
            self._timer = None
        self.flush()

    def flush(self) -> None:
        """Write the pending usage, audit entries and last uses in one
        transaction; a busy database keeps them for the next batch."""
        usage, audit, used = self.usage.take(), self.audit.take(), self.keyring.used_keys()
        if not (usage or audit or used):
            return
        try:
            with store.database.atomic():
                self.usage.write(usage)
                self.audit.write(audit)
                for key in used:
                    stamp = datetime.datetime.fromtimestamp(key.last_used or 0,
                                                            datetime.timezone.utc)
                    store.ApiKey.update(last_used_at=stamp.replace(tzinfo=None)).where(
                        store.ApiKey.id == key.id).execute()
        except (peewee.OperationalError, peewee.InterfaceError) as exc:
            log.warning("usage not written yet, trying again: %s", exc)
            self.usage.put_back(usage)
            self.audit.put_back(audit)
            for key in used:
                key.used_since_flush = True

    # -- settings -------------------------------------------------------------------
    @staticmethod
    def check_mode(value: Any) -> None:
        if not isinstance(value, str) or value not in MODES:
            raise ValidationError({"inference_auth": f"must be one of: {', '.join(MODES)}"})

    def set_mode(self, value: Any) -> None:
        self.check_mode(value)
        store.set_config("inference_auth", value)
        self.mode_saved(value)

    def mode_saved(self, value: str) -> None:
        """The stored access mode changed: apply it from the next request."""
        self.mode_applied(value)
        self.on_change("inference_auth", None)

    def mode_applied(self, value: str) -> None:
        """The access mode stored (here or by another instance) applies."""
        if value not in MODES:
            return
        self.mode = value
        log.info("inference access is now %s", "by key only" if value == "keys" else "open")
        self.warn_if_exposed()

    def warn_if_exposed(self) -> bool:
        """Say plainly when anyone who reaches the port may use every node."""
        if self.mode == "open" and self.exposed:
            log.warning("inference_auth is \"open\" and Aivonx listens on %s, not only on "
                        "loopback: anyone who reaches this port may use every node. Set "
                        "inference_auth to \"keys\" in /api/proxy/config to require keys.",
                        self.host)
            return True
        return False

    @property
    def exposed(self) -> bool:
        return not is_loopback_host(self.host)

    # -- per request ------------------------------------------------------------------
    def identify(self, token: str | None) -> Key:
        """The key a request carries. Under "open" a request without a valid
        key is the anonymous key's; under "keys" it is a 401."""
        key = self.keyring.check(token) if token else None
        if key is not None:
            return key
        if self.mode == "keys":
            self.metrics.key_rejected[("unauthorized",)] += 1
            message = ("invalid or expired API key" if token else
                       "an API key is required: send it as 'Authorization: Bearer <key>' "
                       "or 'x-api-key: <key>'")
            raise ApiError(401, message, {"WWW-Authenticate": "Bearer"})
        return ANONYMOUS

    async def admit(self, key: Key, model_key: str | None, model_name: str = "") -> float:
        """Apply the key's allow-list and limits; returns the admission time
        for `finish`. 403 for a model the key may not use, 429 over a limit.
        With --redis a key with limits is counted cluster-wide (one Redis
        round trip); any other key never waits."""
        if model_key is not None and not key.allows(model_key):
            self.metrics.key_rejected[("model",)] += 1
            raise ApiError(403, f"key '{key.name}' may not use model '{model_name[:200]}'")
        now = time.time()
        try:
            if self.shared is not None and limited(key):
                await self.shared.admit(key, now)
            else:
                self.limits.admit(key, now)
        except LimitExceeded as exc:
            self.metrics.key_rejected[(exc.limit,)] += 1
            raise ApiError(429, exc.message, {"Retry-After": str(exc.retry_after)}) from None
        if key.id:
            self.keyring.touch(key, now)
        return now

    def finish(self, key: Key, model: str, meter: Meter | None) -> None:
        """The request is over: free its concurrency slot, count its use
        (`meter` None: answered without a node, nothing used)."""
        self.limits.done(key)
        if self.shared is not None:
            self.shared.done(key)
        now = time.time()
        if meter is not None and meter.ended:
            tokens = meter.prompt + meter.completion
            self.usage.add(key.id, model, now, prompt=meter.prompt,
                           completion=meter.completion, error=not meter.ok,
                           estimated=meter.estimated, node_seconds=meter.node_seconds)
            if tokens:
                if self.shared is not None:
                    self.shared.add_tokens(key, tokens, now)
                self.limits.add_tokens(key.id, tokens, now)
                self.metrics.key_tokens[(key.name, "prompt")] += meter.prompt
                self.metrics.key_tokens[(key.name, "completion")] += meter.completion
        else:
            self.usage.add(key.id, model, now, error=meter is not None)
        self.metrics.key_requests[(key.name,)] += 1

    def names(self) -> dict[int, str]:
        return {k.id: k.name for k in self.keyring.by_id.values()}
