"""The status page: see and steer the cluster from a browser.

One server-rendered page (`/ui`) shows every node and the cluster totals, so
it is complete without JavaScript; static/ui.js then keeps it live by polling
the state API and updating the DOM with textContent/createElement only.

Signed in (same accounts as the API, a session cookie), the page also has
forms to add, edit, drain and delete nodes, change the strategy and pull a
model. Every form is a plain POST that redirects back with a message, so it
works without JavaScript; the script submits the same forms with fetch()
(asking for JSON) and streams pull progress. Every POST checks Tornado's
XSRF token explicitly: the app-wide `xsrf_cookies` setting would break the
Ollama API's POSTs.
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from typing import Any

import tornado.web
from tornado.iostream import StreamClosedError

from .. import modelnames, modelops, nodes, pulls
from ..auth import AuthError
from ..registry import HISTORY_LENGTH, NodeState
from ..router import STRATEGIES
from ..status import cluster_state
from ..context import Context
from .base import BaseHandler

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
XSRF_COOKIE_KWARGS = dict(COOKIE_FLAGS)

SPARK_WIDTH, SPARK_HEIGHT = 120, 28
CHIP_LIMIT = 8  # model chips shown per node before "+N more"
MAX_FLASH = 500
MAX_FIELD = 1000  # form values are short; longer ones are cut before validation

# What the row template is rendered with, for static/ui.js to clone.
BLANK_NODE = {"id": 0, "name": "", "url": "", "status": "standby", "health": "unhealthy",
              "health_reason": "", "since": None, "reason": "", "latency": None,
              "latency_history": [], "active_requests": 0, "slots": 4, "weight": 1.0,
              "requests_served": 0, "errors": 0, "models": [], "loaded": []}

_background: set[asyncio.Future] = set()  # pulls started without JavaScript


def ago(since: float | None, now: float | None = None) -> str:
    """How long ago, compactly: 42s, 3m 07s, 5h 02m, 2d 4h."""
    if since is None:
        return "—"
    seconds = max(0, int((time.time() if now is None else now) - since))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h"


def latency_text(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 0.001:
        return "<1 ms"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds:.2f} s"


def wait_text(seconds: float | None) -> str:
    """A wait in the queue: 350 ms, 4.2 s, 17 s, 2m 00s."""
    if seconds is None:
        return "—"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes}m {rest:02d}s"


def weight_text(weight: float) -> str:
    """A weight as people write it: 3, 2.5, 0.25 (static/ui.js writes the same)."""
    return f"{weight:g}"


def pool_text(node: dict[str, Any]) -> str:
    """Whether a degraded node still gets requests, or (resting) only those no
    other node can serve; the other health states say it themselves."""
    if node["health"] != "degraded":
        return ""
    return "still serving" if node["status"] == "active" else "last resort only"


def spark_points(history: list[float | None]) -> str:
    """SVG polyline points for a latency history, newest at the right edge,
    scaled to the largest sample (static/ui.js draws the same)."""
    values = [v for v in history if v is not None][-HISTORY_LENGTH:]
    if len(values) < 2:
        return ""
    top = max(values) * 1.15 or 1.0
    step = SPARK_WIDTH / (HISTORY_LENGTH - 1)
    offset = SPARK_WIDTH - step * (len(values) - 1)
    usable = SPARK_HEIGHT - 4
    return " ".join(f"{offset + i * step:.1f},{SPARK_HEIGHT - 2 - v / top * usable:.1f}"
                    for i, v in enumerate(values))


def overall(state: dict[str, Any]) -> tuple[str, str]:
    """One line for the whole cluster, and its tone: ok, warn or bad."""
    nodes = state["nodes"]
    active = sum(1 for n in nodes if n["status"] == "active")
    enabled = sum(1 for n in nodes if n["status"] != "drained")
    degraded = sum(1 for n in nodes if n["health"] == "degraded")
    if not nodes:
        return "No nodes configured", "warn"
    if active == 0:
        return "No node is serving", "bad"
    if active < enabled:
        down = enabled - active
        return f"{down} of {enabled} node{'s' if enabled != 1 else ''} down", "warn"
    if degraded:
        return f"All nodes serving, {degraded} degraded", "warn"
    return "All nodes serving", "ok"


def capacity(state: dict[str, Any]) -> int:
    """Requests the serving nodes take at once, before requests queue."""
    return sum(n["slots"] for n in state["nodes"] if n["status"] == "active")


def form_number(text: str) -> Any:
    """A number typed in a form, as JSON would carry it (3 or 2.5); anything
    else stays text for the validation to name the field."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def is_loopback(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.strip("[]").lower()
    return name in ("localhost", "::1") or name.startswith("127.") or name.endswith(
        ".localhost")


class FormError(Exception):
    """A form that cannot be applied: messages by field ("form" for the
    whole form), the HTTP status, and which form it was."""

    def __init__(self, form: str, errors: dict[str, str], status: int = 400) -> None:
        super().__init__("; ".join(errors.values()))
        self.form = form
        self.errors = errors
        self.status = status


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
        except (ValueError, TypeError):
            return None
        if kind not in ("ok", "error", "info") or not isinstance(text, str):
            return None
        return kind, text[:MAX_FLASH]

    # -- rendering ----------------------------------------------------------
    def get_template_namespace(self) -> dict[str, Any]:
        namespace = super().get_template_namespace()
        namespace.update(ago=ago, latency_text=latency_text, spark_points=spark_points,
                         wait_text=wait_text, weight_text=weight_text, pool_text=pool_text,
                         capacity=capacity,
                         spark_width=SPARK_WIDTH, spark_height=SPARK_HEIGHT,
                         spark_slots=HISTORY_LENGTH, chip_limit=CHIP_LIMIT,
                         blank_node=BLANK_NODE, state_url="/api/proxy/state")
        return namespace

    def render_status(self, status: int = 200, flash: tuple[str, str] | None = None,
                      form: str | None = None, errors: dict[str, str] | None = None,
                      values: dict[str, str] | None = None) -> None:
        """The status page; after a failed form, that form open with its
        values and the error of each field."""
        state = cluster_state(self.ctx.registry, self.ctx.scheduler, self.ctx.router.strategy)
        summary, tone = overall(state)
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


class FormHandler(PageHandler):
    """A signed-in user's form: XSRF-checked, answered with a redirect and a
    message (plain form) or JSON (the page's script)."""

    form = "form"  # which form of the page, to reopen it on errors
    audited = True

    def prepare(self) -> None:
        if self.request.method != "POST":
            return
        try:
            self.check_xsrf_cookie()
        except tornado.web.HTTPError:
            raise tornado.web.HTTPError(
                403, "This form has expired or your browser did not send its cookie: "
                     "reload the page and try again.") from None
        if self.current_user is None:
            if self.wants_json():
                raise tornado.web.HTTPError(401, "Your session has ended: sign in again.")
            self.set_flash("error", "Your session has ended: sign in again.")
            self.redirect("/ui/login")

    def field(self, name: str) -> str:
        return self.get_body_argument(name, "")[:MAX_FIELD].strip()

    def done(self, message: str, **extra: Any) -> None:
        if self.wants_json():
            self.write_json({"ok": True, "message": message, **extra})
            return
        self.set_flash("ok", message)
        self.redirect("/ui")

    def _handle_request_exception(self, e: BaseException) -> None:
        if isinstance(e, nodes.ValidationError):
            e = FormError(self.form, e.errors, e.status)
        if isinstance(e, FormError) and not self._finished:
            message = "; ".join(e.errors.values())
            if self.wants_json():
                self.write_json({"ok": False, "message": message, "errors": e.errors}, e.status)
            else:
                values = {k: v[-1].decode(errors="replace")[:MAX_FIELD]
                          for k, v in self.request.body_arguments.items() if k != "_xsrf"}
                self.render_status(e.status, ("error", message), e.form, e.errors, values)
            return
        super()._handle_request_exception(e)

    def node_id(self, text: str) -> int:
        if len(text) > 18:
            raise tornado.web.HTTPError(404, "No such node.")
        return int(text)


# -- pages ------------------------------------------------------------------------

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


class LogoutFormHandler(FormHandler):
    def prepare(self) -> None:
        try:
            self.check_xsrf_cookie()
        except tornado.web.HTTPError:
            raise tornado.web.HTTPError(403, "This form has expired: reload the page.") from None

    def post(self) -> None:
        self.sign_out()
        self.set_flash("info", "Signed out.")
        self.redirect("/ui")


# -- forms ------------------------------------------------------------------------

class AddNodeHandler(FormHandler):
    form = "add"

    def post(self) -> None:
        data: dict[str, Any] = {"address": self.field("address")}
        if self.field("name"):
            data["name"] = self.field("name")
        for name in ("slots", "weight"):  # optional here: 4 slots, weight 1
            if self.field(name):
                data[name] = form_number(self.field(name))
        node = self.ctx.nodes.create(data)
        self.done(f"Added node {node.name}; it is being probed.", node_id=node.id)


class EditNodeHandler(FormHandler):
    def post(self, node_id: str) -> None:
        self.form = f"edit-{node_id}"
        data = {"name": self.field("name"), "address": self.field("address")}
        for name in ("slots", "weight"):  # a form without them changes neither
            if name in self.request.body_arguments:
                data[name] = form_number(self.field(name))
        try:
            node = self.ctx.nodes.update(self.node_id(node_id), data, partial=True)
        except LookupError:
            raise tornado.web.HTTPError(404, "No such node: it was deleted.") from None
        self.done(f"Saved node {node.name}.")


class DrainNodeHandler(FormHandler):
    def post(self, node_id: str) -> None:
        self.form = f"drain-{node_id}"
        active = self.field("active") == "1"
        try:
            node = self.ctx.nodes.update(self.node_id(node_id), {"active": active},
                                     partial=True)
        except LookupError:
            raise tornado.web.HTTPError(404, "No such node: it was deleted.") from None
        self.done(f"Node {node.name} is back in the pool." if active else
                  f"Drained node {node.name}: requests in flight finish, no new ones go there.")


class DeleteNodeHandler(FormHandler):
    def post(self, node_id: str) -> None:
        number = self.node_id(node_id)
        state = self.ctx.registry.nodes.get(number)
        try:
            self.ctx.nodes.delete(number)
        except LookupError:
            raise tornado.web.HTTPError(404, "No such node: it was already deleted.") from None
        self.done(f"Deleted node {state.name if state else number}.")


class StrategyHandler(FormHandler):
    form = "strategy"

    def post(self) -> None:
        self.ctx.nodes.set_strategy(self.field("strategy"))
        self.done(f"Strategy is now {self.ctx.router.strategy}.")


class PullFormHandler(FormHandler):
    """Pull a model onto one node or every serving node. The page's script
    asks for NDJSON and gets each node's progress as it arrives, then a
    summary; a plain form starts the pull and returns at once."""

    form = "pull"

    def initialize(self, ctx: Context) -> None:
        super().initialize(ctx)
        self.cancel = pulls.Cancel()

    def on_connection_close(self) -> None:
        self.cancel.cancel()  # the page went away: stop the nodes' downloads

    def targets(self) -> list[NodeState]:
        wanted = self.field("node") or "all"
        if wanted == "all":
            targets = sorted(self.ctx.registry.routable(), key=lambda n: n.id)
            if not targets:
                raise FormError(self.form, {"node": "No node is serving right now."}, 503)
            return targets
        node = self.ctx.registry.nodes.get(self.node_id(wanted)) if wanted.isdigit() else None
        if node is None:
            raise FormError(self.form, {"node": "No such node."}, 404)
        return [node]

    def model(self) -> str:
        model = self.field("model")
        if not model:
            raise FormError(self.form, {"model": "Name the model to pull."})
        try:
            modelnames.canonical(model)
        except modelnames.InvalidModelName as exc:
            raise FormError(self.form, {"model": f"Invalid model name: {exc}"}) from None
        return model

    async def post(self) -> None:
        model, targets = self.model(), self.targets()
        names = ", ".join(n.name for n in targets)
        if "application/x-ndjson" not in self.request.headers.get("Accept", ""):
            task = asyncio.ensure_future(self.pull(model, targets, lambda node, line: None))
            _background.add(task)
            task.add_done_callback(_background.discard)
            self.done(f"Pulling {model} on {names}. It shows under Models when done.")
            return
        self.set_header("Content-Type", "application/x-ndjson")
        await self.send({"nodes": [{"node_id": n.id, "node": n.name} for n in targets],
                         "model": model})

        async def progress(node: NodeState, line: dict[str, Any]) -> None:
            await self.send({**line, "node_id": node.id, "node": node.name})

        summary = await self.pull(model, targets, progress, self.cancel)
        if not self.cancel.cancelled:
            await self.send(summary)
            self.finish()

    async def pull(self, model: str, targets: list[NodeState], progress: Any,
                   cancel: pulls.Cancel | None = None) -> dict[str, Any]:
        results = await pulls.pull(self.ctx, model, targets, progress, cancel=cancel)
        if cancel is not None and cancel.cancelled:
            return {}
        await modelops.reprobe(self.ctx, targets)  # the table lists it at once
        error = modelops.failure_message("pull", targets,
                                         {i: r.get("error") for i, r in results.items()})
        summary = {"done": True, "model": model, "status": "error" if error else "success",
                   "results": [{"node_id": n.id, "node": n.name, **results[n.id]}
                               for n in targets]}
        if error:
            summary["error"] = error
        return summary

    async def send(self, obj: dict[str, Any]) -> None:
        if self.cancel.cancelled:
            return
        self.write(json.dumps(obj, separators=(",", ":")) + "\n")
        try:
            await self.flush()
        except StreamClosedError:
            self.cancel.cancel()
