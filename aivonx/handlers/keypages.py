"""The status page's keys section: its panel, and the forms to create and
revoke keys. A new key is shown once, on the page answering its form."""
from __future__ import annotations

from typing import Any

import tornado.web

from ..keys import display
from .forms import FormHandler, form_number


class KeysPanel(tornado.web.UIModule):
    """`{% module KeysPanel() %}` in status.html: the warning when inference
    is open beyond loopback, and, signed in, the keys and usage charts."""

    def render(self) -> str:
        handler: Any = self.handler
        keys = handler.ctx.keys
        signed_in = handler.current_user is not None
        return self.render_string(
            "_keys.html", exposed=keys.mode == "open" and keys.exposed, mode=keys.mode,
            host=keys.host, signed_in=signed_in,
            keys=display.key_rows(keys) if signed_in else [],
            charts=display.usage_charts(keys) if signed_in else [],
            bar_width=display.BAR_WIDTH)


class CreateKeyHandler(FormHandler):
    form = "key"

    def post(self) -> None:
        data: dict[str, Any] = {"name": self.field("name"),
                                "kind": self.field("kind") or "inference"}
        models = [m.strip() for m in self.field("models").split(",") if m.strip()]
        if models:
            data["models"] = models
        for name in ("rpm", "max_concurrent", "daily_tokens", "monthly_tokens", "priority"):
            if self.field(name):
                data[name] = form_number(self.field(name))
        if self.field("expires_at"):
            data["expires_at"] = self.field("expires_at")
        row, token = self.ctx.keys.keyring.create(data, self.current_user)
        if self.wants_json():
            self.write_json({"ok": True, "message": f"Created key {row.name}", "key": token})
            return
        self.render("key_created.html", name=row.name, kind=row.kind, key=token)


class RevokeKeyHandler(FormHandler):
    form = "key"

    def post(self, key_id: str) -> None:
        if len(key_id) > 18:
            raise tornado.web.HTTPError(404, "No such key.")
        try:
            row = self.ctx.keys.keyring.revoke(int(key_id))
        except LookupError:
            raise tornado.web.HTTPError(404, "No such key.") from None
        self.done(f"Revoked key {row.name}; it is refused from now on.")
