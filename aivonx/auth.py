"""Accounts: password hashing, login throttling, bearer tokens, the admin check.

Passwords are hashed with scrypt (stdlib, memory-hard), always in an
executor: one hash takes ~50 ms, far too long for the event loop. Tokens are
random strings handed out once; only their SHA-256 is stored, so they
survive a restart and a copy of the database does not hand out sessions.
Every lookup reads the database (a primary-key read costs ~0.05 ms), so a
revocation takes effect at once, also across instances sharing a database.
"""
from __future__ import annotations

import base64
import datetime
import functools
import hashlib
import hmac
import logging
import re
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable, TypeVar

import peewee
from tornado.ioloop import IOLoop

from . import store
from .errors import ApiError

log = logging.getLogger("aivonx.auth")

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 14, 8, 1
SALT_BYTES = 16
KEY_BYTES = 32
SCRYPT_MAXMEM = 64 * 1024 * 1024
# Bounds on what a stored hash may ask for, so a tampered row cannot make a
# login allocate gigabytes.
MAX_SCRYPT_N = 2 ** 20

MIN_PASSWORD = 8
MAX_PASSWORD = 1024   # hashing cost grows with the input: bound it
MAX_TOKEN = 200
USERNAME = re.compile(r"[A-Za-z0-9@.+_-]{1,150}")  # whole string (fullmatch)

TOKEN_LIFETIMES = {
    "access": datetime.timedelta(hours=1),
    "refresh": datetime.timedelta(days=30),
    "session": datetime.timedelta(hours=12),   # the status page's cookie
}

# Failed logins allowed per username and client address within the window.
# Behind a reverse proxy every client shares one address, so the bound per
# address alone (guessing many names) is far looser, and it never refuses a
# username that has had no failure from that address: one person's typos do
# not lock the admins out.
MAX_FAILURES = 5
MAX_FAILURES_PER_ADDRESS = 300
FAILURE_WINDOW = 300.0
MAX_TRACKED = 10_000


class AuthError(Exception):
    """A login or token refused: status 400, 401 or 429 and a message."""

    def __init__(self, status: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


# -- passwords -----------------------------------------------------------------

def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str) -> str:
    """`scrypt$n$r$p$salt$hash`; CPU-bound, call it in an executor."""
    salt = secrets.token_bytes(SALT_BYTES)
    key = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=SCRYPT_N, r=SCRYPT_R,
                         p=SCRYPT_P, dklen=KEY_BYTES, maxmem=SCRYPT_MAXMEM)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(key)}"


def verify_password(password: str, stored: str) -> bool:
    """Constant-time check of a password against a stored hash; False for
    any malformed hash. CPU-bound, call it in an executor."""
    try:
        scheme, n, r, p, salt, key = stored.split("$")
        n, r, p = int(n), int(r), int(p)
        salt_bytes, key_bytes = base64.b64decode(salt), base64.b64decode(key)
    except ValueError:
        return False
    if scheme != "scrypt" or not (1 < n <= MAX_SCRYPT_N and 0 < r <= 32 and 0 < p <= 4):
        return False
    try:
        candidate = hashlib.scrypt(password.encode("utf-8"), salt=salt_bytes, n=n, r=r, p=p,
                                   dklen=len(key_bytes), maxmem=4 * SCRYPT_MAXMEM)
    except ValueError:
        return False
    return hmac.compare_digest(candidate, key_bytes)


def check_new_password(password: Any) -> str:
    """The password policy for new passwords; raises ValueError."""
    if not isinstance(password, str) or len(password) < MIN_PASSWORD:
        raise ValueError(f"password must have at least {MIN_PASSWORD} characters")
    if len(password) > MAX_PASSWORD:
        raise ValueError(f"password must have at most {MAX_PASSWORD} characters")
    return password


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


# Each scrypt hash holds 16 MiB while it runs, and glibc keeps a thread's
# arena after it: hashing in the shared default executor (up to cpus + 4
# threads) let one burst of logins raise the RSS by 80 MB for good. Two
# threads keep a burst's cost at two hashes' worth; the attempts past the
# throttle never reach here anyway.
_HASHING = ThreadPoolExecutor(max_workers=2, thread_name_prefix="aivonx-hash")


async def _in_executor(fn: Callable[..., Any], *args: Any) -> Any:
    return await IOLoop.current().run_in_executor(_HASHING, fn, *args)


# -- throttling ------------------------------------------------------------------

class LoginThrottle:
    """Counts login attempts per key in a sliding window; memory is bounded
    by forgetting the oldest keys.

    An attempt is counted when it starts (`reserve`), before the password is
    hashed, so a burst of parallel guesses meets the limit as a sequence of
    guesses would; a success forgives the key's failures (`succeeded`) or
    gives back its own reservation (`release`)."""

    def __init__(self, max_failures: int = MAX_FAILURES, window: float = FAILURE_WINDOW,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_failures = max_failures
        self.window = window
        self.clock = clock
        self._failures: dict[Any, list[float]] = {}

    def _recent(self, key: Any) -> list[float]:
        cutoff = self.clock() - self.window
        times = [t for t in self._failures.get(key, ()) if t > cutoff]
        if times:
            self._failures[key] = times
        else:
            self._failures.pop(key, None)
        return times

    def count(self, key: Any) -> int:
        """Attempts counted against `key` within the window."""
        return len(self._recent(key))

    def retry_after(self, key: Any) -> int | None:
        """Seconds until the next attempt is allowed, None if allowed now."""
        times = self._recent(key)
        if len(times) < self.max_failures:
            return None
        return max(1, int(times[-self.max_failures] + self.window - self.clock()) + 1)

    def reserve(self, key: Any) -> float:
        """Count an attempt now, as failed until told otherwise; returns its
        stamp for `release`."""
        stamp = self.clock()
        times = self._recent(key)
        times.append(stamp)
        self._failures.pop(key, None)
        self._failures[key] = times[-self.max_failures:]
        while len(self._failures) > MAX_TRACKED:
            del self._failures[next(iter(self._failures))]
        return stamp

    def release(self, key: Any, stamp: float) -> None:
        """Uncount one reserved attempt that turned out to succeed."""
        times = self._failures.get(key)
        if times and stamp in times:
            times.remove(stamp)
            if not times:
                del self._failures[key]

    def succeeded(self, key: Any) -> None:
        self._failures.pop(key, None)


# -- accounts and tokens -------------------------------------------------------------

class Auth:
    """Users, their passwords and their tokens, on `ctx.auth`."""

    def __init__(self, root_password: str | None = None) -> None:
        self.root_password = root_password
        self.throttle = LoginThrottle(MAX_FAILURES)
        self.address_throttle = LoginThrottle(MAX_FAILURES_PER_ADDRESS)
        self._dummy_hash: str | None = None
        # Told of every refused login (username, address, status): the audit log.
        self.on_failed_login: Callable[[str, str, int], None] | None = None

    def _failed(self, username: str, client_ip: str, status: int) -> None:
        if self.on_failed_login is not None:
            self.on_failed_login(username[:150], client_ip, status)

    async def authenticate(self, username: Any, password: Any, client_ip: str) -> store.User:
        """The user for a username and password, or AuthError: 400 missing
        field, 401 wrong, 429 after repeated failures (with retry_after)."""
        missing = [name for name, value in (("username", username), ("password", password))
                   if not isinstance(value, str) or not value]
        if missing:
            raise AuthError(400, f"{' and '.join(missing)} required")
        key, address = (username.lower()[:150], client_ip or ""), client_ip or ""
        wait = self.throttle.retry_after(key)
        if wait is None and self.throttle.count(key):
            wait = self.address_throttle.retry_after(address)
        if wait is not None:
            self._failed(username, client_ip, 429)
            raise AuthError(429, f"too many failed logins; try again in {wait} s", wait)
        # Counted before the ~50 ms hash, with no await in between: parallel
        # guesses cannot all pass the check above before one is counted.
        self.throttle.reserve(key)
        address_stamp = self.address_throttle.reserve(address)
        user = await store.run(store.User.get_or_none, store.User.username == username) \
            if USERNAME.fullmatch(username) else None
        if user is None:
            # Spend the same time as for a real user: no probing for names.
            if self._dummy_hash is None:
                self._dummy_hash = await _in_executor(hash_password, secrets.token_urlsafe())
            stored = self._dummy_hash
        else:
            stored = user.password_hash
        ok = len(password) <= MAX_PASSWORD and await _in_executor(verify_password, password,
                                                                  stored)
        if not ok or user is None:
            log.info("failed login for %r from %s", username[:150], client_ip)
            self._failed(username, client_ip, 401)
            raise AuthError(401, "invalid username or password")
        self.throttle.succeeded(key)
        self.address_throttle.release(address, address_stamp)
        return user

    def issue(self, user: store.User, kind: str, family: str | None = None) -> str:
        """A new token of `kind` (access, refresh or session). Tokens of one
        login share a family, revoked together at logout."""
        lifetime = TOKEN_LIFETIMES[kind]
        token = secrets.token_urlsafe(32)
        store.Token.create(token_hash=token_hash(token), user=user, kind=kind,
                           family=family or secrets.token_hex(16),
                           expires_at=store.utcnow() + lifetime)
        return token

    def login(self, user: store.User) -> dict[str, Any]:
        """An access and a refresh token of a new family, as login answers."""
        with store.database.atomic():
            self._purge_expired()
            family = secrets.token_hex(16)
            return {"access": self.issue(user, "access", family),
                    "refresh": self.issue(user, "refresh", family),
                    "token_type": "Bearer",
                    "expires_in": int(TOKEN_LIFETIMES["access"].total_seconds())}

    def refresh(self, refresh_token: Any) -> str:
        """A new access token for a valid refresh token (same family)."""
        row = self._valid(refresh_token, "refresh")
        if row is None:
            raise AuthError(401, "invalid or expired refresh token")
        return self.issue(row.user, "access", row.family)

    def _valid(self, token: Any, kind: str) -> store.Token | None:
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN:
            return None
        row = (store.Token.select(store.Token, store.User)
               .join(store.User)
               .where(store.Token.token_hash == token_hash(token))
               .first())
        if row is None or row.kind != kind or row.revoked or row.expires_at <= store.utcnow():
            return None
        return row

    def user_for(self, token: str | None, kind: str = "access") -> store.User | None:
        """The user of a valid token of `kind`; None when missing, unknown,
        expired or revoked."""
        row = self._valid(token, kind)
        return row.user if row is not None else None

    def revoke(self, token: str) -> None:
        """Revoke a token and every token of its family (its login)."""
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN:
            return
        row = store.Token.get_or_none(store.Token.token_hash == token_hash(token))
        if row is not None:
            store.Token.update(revoked=True).where(store.Token.family == row.family).execute()

    def _purge_expired(self) -> None:
        store.Token.delete().where(store.Token.expires_at < store.utcnow()).execute()

    async def set_password(self, username: str, password: str) -> bool:
        """Set a user's password, creating the user if needed (returns True
        then). Every token the user had is revoked. ValueError when the
        username or password is not acceptable."""
        if not isinstance(username, str) or not USERNAME.fullmatch(username):
            raise ValueError("username must be 1-150 letters, digits or @.+_-")
        hashed = await _in_executor(hash_password, check_new_password(password))
        return await store.run(self._store_password, username, hashed)

    @staticmethod
    def _store_password(username: str, hashed: str) -> bool:
        with store.database.atomic():
            user = store.User.get_or_none(store.User.username == username)
            if user is None:
                store.User.create(username=username, password_hash=hashed)
                return True
            user.password_hash = hashed
            user.save()
            store.Token.update(revoked=True).where(store.Token.user == user).execute()
            return False

    def ensure_root(self) -> str | None:
        """Create user root at first start, with the configured password or
        a generated one, which is returned so it can be shown once."""
        if store.User.get_or_none(store.User.username == "root") is not None:
            return None
        password, generated = self.root_password, None
        if not password:
            password = generated = secrets.token_urlsafe(18)
        elif len(password) < MIN_PASSWORD:
            log.warning("the root password is shorter than %d characters", MIN_PASSWORD)
        # Once, at start-up before serving: hashing inline is acceptable here.
        try:
            store.User.create(username="root", password_hash=hash_password(password))
        except peewee.IntegrityError:
            return None  # another instance sharing the database created it just now
        log.info("created user root")
        return generated


# -- handler decorator -----------------------------------------------------------------

F = TypeVar("F", bound=Callable[..., Any])


def admin_required(method: F) -> F:
    """Handler methods wrapped with this answer 401 `{"error": ...}` unless
    the request carries a valid access token."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Awaitable[None] | None:
        if self.current_user is None:
            raise ApiError(401, "authentication required", {"WWW-Authenticate": "Bearer"})
        return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
