"""The status page's forms: add, edit, drain and delete nodes, change the
strategy, pull a model, sign out.

Every form is a plain POST that redirects back with a message, so it works
without JavaScript; the page's script sends the same forms with fetch()
(asking for JSON) and streams pull progress. Every POST checks the XSRF
token explicitly (see PageHandler): the app-wide `xsrf_cookies` setting
would break the Ollama API's POSTs.
"""
from __future__ import annotations

import json
from typing import Any

import tornado.web
from tornado.iostream import StreamClosedError

from .. import modelnames, nodes
from ..modelops import Cancel
from ..context import Context
from ..registry import NodeState
from .pages import PageHandler

MAX_FIELD = 1000  # form values are short; longer ones are cut before validation



def form_number(text: str) -> Any:
    """A number typed in a form, as JSON would carry it (3 or 2.5); anything
    else stays text for the validation to name the field."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


class FormError(Exception):
    """A form that cannot be applied: messages by field ("form" for the
    whole form), the HTTP status, and which form it was."""

    def __init__(self, form: str, errors: dict[str, str], status: int = 400) -> None:
        super().__init__("; ".join(errors.values()))
        self.form = form
        self.errors = errors
        self.status = status


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
        # ASCII digits only: str.isdigit() and int() take "²" or "١" too.
        if len(text) > 18 or not (text.isascii() and text.isdigit()):
            raise tornado.web.HTTPError(404, "No such node.")
        return int(text)



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


class AddNodeHandler(FormHandler):
    form = "add"

    async def post(self) -> None:
        data: dict[str, Any] = {"address": self.field("address")}
        if self.field("name"):
            data["name"] = self.field("name")
        for name in ("slots", "weight"):  # optional here: 4 slots, weight 1
            if self.field(name):
                data[name] = form_number(self.field(name))
        node = await self.ctx.nodes.create_async(data)
        self.done(f"Added node {node.name}; it is being probed.", node_id=node.id)


class EditNodeHandler(FormHandler):
    async def post(self, node_id: str) -> None:
        self.form = f"edit-{node_id}"
        data = {"name": self.field("name"), "address": self.field("address")}
        for name in ("slots", "weight"):  # a form without them changes neither
            if name in self.request.body_arguments:
                data[name] = form_number(self.field(name))
        try:
            node = await self.ctx.nodes.update_async(self.node_id(node_id), data, partial=True)
        except LookupError:
            raise tornado.web.HTTPError(404, "No such node: it was deleted.") from None
        self.done(f"Saved node {node.name}.")


class DrainNodeHandler(FormHandler):
    async def post(self, node_id: str) -> None:
        self.form = f"drain-{node_id}"
        active = self.field("active") == "1"
        try:
            node = await self.ctx.nodes.update_async(self.node_id(node_id), {"active": active},
                                                     partial=True)
        except LookupError:
            raise tornado.web.HTTPError(404, "No such node: it was deleted.") from None
        self.done(f"Node {node.name} is back in the pool." if active else
                  f"Drained node {node.name}: requests in flight finish, no new ones go there.")


class DeleteNodeHandler(FormHandler):
    async def post(self, node_id: str) -> None:
        number = self.node_id(node_id)
        state = self.ctx.registry.nodes.get(number)
        try:
            await self.ctx.nodes.delete_async(number)
        except LookupError:
            raise tornado.web.HTTPError(404, "No such node: it was already deleted.") from None
        self.done(f"Deleted node {state.name if state else number}.")


class StrategyHandler(FormHandler):
    form = "strategy"

    async def post(self) -> None:
        await self.ctx.nodes.set_strategy_async(self.field("strategy"))
        self.done(f"Strategy is now {self.ctx.router.strategy}.")


class PullFormHandler(FormHandler):
    """Pull a model onto one node or every serving node. The page's script
    asks for NDJSON and gets each node's progress as it arrives, then a
    summary; a plain form starts the pull and returns at once."""

    form = "pull"

    def initialize(self, ctx: Context) -> None:
        super().initialize(ctx)
        self.cancel = Cancel()

    def on_connection_close(self) -> None:
        super().on_connection_close()
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
            self.ctx.modelops.start_pull(model, targets)
            self.done(f"Pulling {model} on {names}. It shows under Models when done.")
            return
        self.set_header("Content-Type", "application/x-ndjson")
        await self.send({"nodes": [{"node_id": n.id, "node": n.name} for n in targets],
                         "model": model})

        async def progress(node: NodeState, line: dict[str, Any]) -> None:
            await self.send({**line, "node_id": node.id, "node": node.name})

        result = await self.ctx.modelops.pull(model, targets, progress, cancel=self.cancel)
        if not result.cancelled:
            await self.send(result.summary(model))
            self.finish()

    async def send(self, obj: dict[str, Any]) -> None:
        if self.cancel.cancelled:
            return
        self.write(json.dumps(obj, separators=(",", ":")) + "\n")
        try:
            await self.flush()
        except StreamClosedError:
            self.cancel.cancel()
