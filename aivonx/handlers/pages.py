"""The status page: see and steer the cluster from a browser.

One server-rendered page (`/ui`) shows every node and the cluster totals, so
it is complete without JavaScript; static/ui.js then keeps it live by polling
the state API and updating the DOM with textContent/createElement only.

Signed in (same accounts as the API, a session cookie), the page also has
the forms of handlers/forms.py. Display strings come from aivonx/display.py.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from typing import Any

import tornado.web

from ..auth import AuthError
from ..display import SPARK_HEIGHT, SPARK_WIDTH, keep_alive_text, node_display
from ..router import STRATEGIES
from ..status import cluster_state
from .base import BaseHandler, RequestIdMixin

log = logging.getLogger("aivonx.pages")

# No inline script or style anywhere: everything comes from static/.
CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
       "frame-ancestors 'none'")

# Cookies live under /ui only. Secure is always set: browsers keep Secure
# cookies over plain http only for localhost/127.0.0.1 (secure contexts),
# so elsewhere sign-in needs HTTPS; the sign-in page says so.
COOKIE_PATH = "/ui"
COOKIE_FLAGS = {"path": COOKIE_PATH, "secure": True, "httponly": True, "samesite": "Strict"}
SESSION_COOKIE = "aivonx_session"
FLASH_COOKIE = "aivonx_flash"
# For Application(xsrf_cookie_kwargs=...): the XSRF cookie gets the same flags
# (the script reads the token from the forms, never from the cookie).
XSRF_COOKIE = "_xsrf"
XSRF_COOKIE_KWARGS = dict(COOKIE_FLAGS)

CHIP_LIMIT = 8  # model chips shown per node before "+N more"
MAX_FLASH = 500

# What the row template is rendered with, for static/ui.js to clone.
BLANK_NODE = {"id": 0, "name": "", "url": "", "status": "standby", "health": "unhealthy",
              "health_reason": "", "since": None, "reason": "", "latency": None,
              "latency_history": [], "active_requests": 0, "slots": 4, "weight": 1.0,
              "requests_served": 0, "errors": 0, "models": [], "loaded": []}
BLANK_NODE["display"] = node_display(BLANK_NODE)


def session_xsrf(session: str) -> bytes:
    """A session's raw XSRF token: an HMAC keyed by the session token, so it
    is valid only with the session cookie it was issued for, and the page
    that shows it reveals nothing of that cookie."""
    return hmac.new(session.encode(), b"aivonx status page forms",
                    hashlib.sha256).digest()[:16]


def is_loopback(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.strip("[]").lower()
    return name in ("localhost", "::1") or name.startswith("127.") or name.endswith(
        ".localhost")



class PageHandler(BaseHandler):
    """HTML pages: strict security headers, the session cookie, errors as
    a small HTML page."""

    def set_default_headers(self) -> None:
        super().set_default_headers()
        self.set_header("Content-Security-Policy", CSP)
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Referrer-Policy", "same-origin")
        self.set_header("X-Frame-Options", "DENY")
        # The page shows live state and, once signed in, carries form tokens.
        self.set_header("Cache-Control", "no-store")

    # -- session ------------------------------------------------------------
    def get_current_user(self) -> Any:
        token = self.get_cookie(SESSION_COOKIE)
        return self.ctx.auth.user_for(token, "session") if token else None

    def sign_in(self, user: Any) -> None:
        self.set_cookie(SESSION_COOKIE, self.ctx.auth.issue(user, "session"), **COOKIE_FLAGS)

    def sign_out(self) -> None:
        token = self.get_cookie(SESSION_COOKIE)
        if token:
            self.ctx.auth.revoke(token)
        self.clear_cookie(SESSION_COOKIE, **COOKIE_FLAGS)
        self.clear_cookie(XSRF_COOKIE, **COOKIE_FLAGS)  # the session's token goes with it

    # -- XSRF: Tornado's double-submit cookie, tied to the session ------------
    # Signed out (the sign-in form), the token is Tornado's random one. Signed
    # in, it is derived from the session cookie: a token issued before signing
    # in or for another session is refused, even with its own XSRF cookie.
    def _get_raw_xsrf_token(self) -> tuple[int | None, bytes, float]:
        raw = super()._get_raw_xsrf_token()
        session = self.get_cookie(SESSION_COOKIE)
        if session:
            bound = session_xsrf(session)
            if raw[0] is None or not hmac.compare_digest(raw[1], bound):
                # No cookie yet, or one from before this session: version None
                # makes Tornado set the session's token as the cookie.
                raw = self._raw_xsrf_token = (None, bound, time.time())
        return raw

    def check_xsrf_cookie(self) -> None:
        super().check_xsrf_cookie()  # the form's token matches the expected one
        if self._get_raw_xsrf_token()[0] is None:  # but no cookie carried it
            raise tornado.web.HTTPError(403, "XSRF cookie missing")

    def secure_context(self) -> bool:
        """Whether a browser keeps our Secure cookies on this connection."""
        forwarded = self.request.headers.get("X-Forwarded-Proto", "").lower()
        return (self.request.protocol == "https" or forwarded == "https"
                or is_loopback(self.request.host))

    # -- flash messages (one-shot, shown by the next page) -------------------
    def set_flash(self, kind: str, text: str) -> None:
        data = json.dumps([kind, text[:MAX_FLASH]]).encode()
        self.set_cookie(FLASH_COOKIE, base64.urlsafe_b64encode(data).decode(), **COOKIE_FLAGS)

    def pop_flash(self) -> tuple[str, str] | None:
        raw = self.get_cookie(FLASH_COOKIE)
        if not raw:
            return None
        self.clear_cookie(FLASH_COOKIE, **COOKIE_FLAGS)
        try:
            kind, text = json.loads(base64.urlsafe_b64decode(raw.encode()))
        except (ValueError, TypeError, RecursionError):  # not a cookie we set
            return None
        if kind not in ("ok", "error", "info") or not isinstance(text, str):
            return None
        return kind, text[:MAX_FLASH]

    # -- rendering ----------------------------------------------------------
    def get_template_namespace(self) -> dict[str, Any]:
        namespace = super().get_template_namespace()
        namespace.update(spark_width=SPARK_WIDTH, spark_height=SPARK_HEIGHT,
                         chip_limit=CHIP_LIMIT,
                         blank_node=BLANK_NODE, state_url="/api/proxy/state",
                         keep_alive=keep_alive_text(self.ctx.keep_alive.as_dict()))
        return namespace

    def render_status(self, status: int = 200, flash: tuple[str, str] | None = None,
                      form: str | None = None, errors: dict[str, str] | None = None,
                      values: dict[str, str] | None = None) -> None:
        """The status page; after a failed form, that form open with its
        values and the error of each field."""
        state = cluster_state(self.ctx.registry, self.ctx.scheduler, self.ctx.router.strategy,
                              self.ctx.instance, self.ctx.cluster)
        summary, tone = state["display"]["summary"], state["display"]["tone"]
        errors, values = errors or {}, values or {}

        def value(form_id: str, name: str, default: Any = "") -> Any:
            return values.get(name, default) if form == form_id else default

        def error(form_id: str, name: str) -> str:
            return errors.get(name, "") if form == form_id else ""

        self.set_status(status)
        self.render("status.html", state=state, summary=summary, tone=tone, now=time.time(),
                    flash=flash, strategies=list(STRATEGIES), form=form, value=value,
                    error=error)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        message = self._reason
        if isinstance(exc, tornado.web.HTTPError) and exc.log_message and status_code < 500:
            message = exc.log_message % exc.args if exc.args else exc.log_message
        if self.wants_json():
            self.set_header("Content-Type", "application/json; charset=utf-8")
            self.finish(json.dumps({"ok": False, "message": message}))
            return
        self.render("error.html", status_code=status_code, message=message)

    def wants_json(self) -> bool:
        """The page's script asks for JSON; a plain form post does not."""
        return "application/json" in self.request.headers.get("Accept", "")



# -- pages ------------------------------------------------------------------------

class StaticAssetHandler(RequestIdMixin, tornado.web.StaticFileHandler):
    """static/: a path no file can have (a NUL byte) is not found, not a
    server error from the file system call."""

    def parse_url_path(self, url_path: str) -> str:
        if "\x00" in url_path:
            raise tornado.web.HTTPError(404)
        return super().parse_url_path(url_path)


class StatusPageHandler(PageHandler):
    def get(self) -> None:
        self.render_status(flash=self.pop_flash())


class LoginPageHandler(PageHandler):
    def get(self) -> None:
        if self.current_user is not None:
            self.redirect("/ui")
            return
        self.render_login(flash=self.pop_flash())

    def render_login(self, status: int = 200, flash: tuple[str, str] | None = None,
                     username: str = "") -> None:
        self.set_status(status)
        self.render("login.html", flash=flash, username=username,
                    insecure=not self.secure_context())

    async def post(self) -> None:
        try:
            self.check_xsrf_cookie()
        except tornado.web.HTTPError:
            self.render_login(403, ("error", "The sign-in form expired or your browser did "
                                             "not send its cookie: try again."))
            return
        username = self.get_body_argument("username", "")[:200]
        password = self.get_body_argument("password", "")[:2000]
        try:
            user = await self.ctx.auth.authenticate(username, password, self.request.remote_ip)
        except AuthError as exc:
            if exc.retry_after:
                self.set_header("Retry-After", str(exc.retry_after))
            message = exc.message[:1].upper() + exc.message[1:] + "."
            self.render_login(exc.status, ("error", message), username)
            return
        self.sign_in(user)
        self.set_flash("ok", f"Signed in as {user.username}.")
        self.redirect("/ui")

