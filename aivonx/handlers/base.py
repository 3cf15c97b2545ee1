"""The base handler every interface shares: JSON errors, never a traceback."""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any
from urllib.parse import parse_qsl

import tornado.web
from tornado import httputil

from .. import store
from ..context import Context
from ..errors import ApiError, error_body
from ..requestid import HEADER as REQUEST_ID_HEADER, request_id
from ..intake import release_body
from ..keys import Key
from ..keys.keyring import KEY_PREFIX

log = logging.getLogger("aivonx.http")

# Management, login and page bodies are small: refused above this.
SMALL_BODY = 1024 * 1024
# Parsing a body this large takes more than a millisecond: do it off the
# event loop so other streams keep flowing.
INLINE_JSON_LIMIT = 256 * 1024


access_log = logging.getLogger("aivonx.access")

_date_second = -1
_date_value = ""


def http_date() -> str:
    """The Date header's value for now (RFC 9110 IMF-fixdate), formatted
    once per second."""
    global _date_second, _date_value
    now = time.time()
    second = int(now)
    if second != _date_second:
        _date_value = httputil.format_timestamp(second)
        _date_second = second
    return _date_value


def log_request(handler: tornado.web.RequestHandler) -> None:
    """Access log without a log call per successful request on the hot
    path: server errors as warnings, everything else only at debug level.
    The fields go to the JSON log as they are (aivonx.logs)."""
    status = handler.get_status()
    if status >= 500:
        level = logging.WARNING
    elif access_log.isEnabledFor(logging.DEBUG):
        level = logging.DEBUG
    else:
        return
    request = handler.request
    fields = {
        "request_id": getattr(handler, "request_id", None),
        "method": request.method,
        "path": request.path,
        "node": handler._headers.get("X-Aivonx-Node"),
        "model": getattr(handler, "log_model", None),
        "key": getattr(handler, "log_key", None),
        "status": status,
        "duration_ms": round(1000.0 * request.request_time(), 2),
        "remote_ip": request.remote_ip,
    }
    extra = "".join(f" {name}={fields[name]}" for name in ("node", "model", "key")
                    if fields[name] is not None)
    access_log.log(level, "%d %s %.2fms id=%s%s", status, handler._request_summary(),
                   fields["duration_ms"], fields["request_id"], extra,
                   extra={"fields": fields})


class RequestIdMixin:
    """Every response carries the request's id in X-Request-Id, error
    answers too (they clear the headers and set the defaults again)."""

    request_id: str | None = None

    def set_default_headers(self) -> None:
        if self.request_id is None:
            self.request_id = request_id(self.request.headers.get(REQUEST_ID_HEADER))
        self.set_header(REQUEST_ID_HEADER, self.request_id)


class BaseHandler(RequestIdMixin, tornado.web.RequestHandler):
    # "ollama": {"error": "..."}; "openai" and "responses": {"error": {"message": ...}};
    # "anthropic": {"type": "error", "error": {"type": ..., "message": ...}}
    error_style = "ollama"
    # The largest body this handler reads (aivonx.intake refuses larger ones
    # from their head); None is the server-wide --max-body-size.
    max_body: int | None = SMALL_BODY

    def initialize(self, ctx: Context) -> None:
        self._ctx = ctx

    @property
    def ctx(self) -> Context:
        """The shared services (aivonx.context): how every handler reaches them."""
        return self._ctx

    def clear(self) -> None:
        """Tornado's clear() without its Server header (the proxy names no
        software) and with a Date formatted once a second, not per request:
        email.utils' formatting was a visible share of a small request."""
        headers = httputil.HTTPHeaders()
        headers["Content-Type"] = "text/html; charset=UTF-8"
        headers["Date"] = http_date()
        self._headers = headers
        self.set_default_headers()
        self._write_buffer = []
        self._status_code = 200
        self._reason = "OK"

    def compute_etag(self) -> None:
        return None

    # Changes through this handler go to the audit log (aivonx.keys.audit).
    audited = False

    def on_finish(self) -> None:
        if self.audited and self.request.method in CHANGES:
            self._audit()
        # A RequestHandler sits in a reference cycle (its ui namespace points
        # back at it): without this its request body would stay in memory
        # until Python's next full garbage collection.
        release_body(self.request)
        store.release_connection()

    def on_connection_close(self) -> None:
        release_body(self.request)

    def bearer_token(self) -> str | None:
        scheme, _, token = self.request.headers.get("Authorization", "").partition(" ")
        return (token.strip() or None) if scheme.lower() == "bearer" else None

    def client_key(self) -> str | None:
        """The key an inference client sends: as a bearer token (ollama and
        OpenAI clients) or as `x-api-key` (Anthropic clients)."""
        return self.bearer_token() or (self.request.headers.get("x-api-key", "").strip()
                                       or None)

    def inference_key(self) -> Key:
        """The key of an inference request (401 under inference_auth "keys"
        without a valid one; the anonymous key under "open")."""
        return self.ctx.keys.identify(self.client_key())

    admin_key: Key | None = None

    def get_current_user(self) -> Any:
        """The user of a valid `Authorization: Bearer` access token, or the
        creator of a valid admin key, else None. Only handlers that ask for
        it look: inference endpoints ignore tokens."""
        token = self.bearer_token()
        if token is not None and token.startswith(KEY_PREFIX):
            key = self.ctx.keys.keyring.check(token)
            if key is None or key.kind != "admin":
                return None
            self.ctx.keys.keyring.touch(key, time.time())
            self.admin_key = key
            user = store.User.get_or_none(store.User.id == key.user_id) \
                if key.user_id is not None else None
            return user if user is not None else KeyUser(key)
        return self.ctx.auth.user_for(token)

    def _audit(self) -> None:
        try:
            user = self.current_user
        except Exception:  # the store failing must not fail the answer
            return
        if user is None:
            return  # refused before anything could change: not an admin's act
        self.ctx.keys.audit.record(self.actor(), self.request.remote_ip or "",
                                   f"{self.request.method} {self.request.path}",
                                   self.get_status(), audit_detail(self.request.body))

    def actor(self) -> str:
        """Who is asking, for the audit log."""
        user = self.current_user
        name = getattr(user, "username", None) or "anonymous"
        if self.admin_key is not None:
            return f"{name} (key '{self.admin_key.name}')"
        return name

    def write_json(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        # allow_nan=False: clients get strict JSON, never Infinity or NaN.
        self.finish(json.dumps(data, allow_nan=False, separators=(",", ":")))

    def write_encoded_json(self, body: bytes, status: int = 200) -> None:
        """JSON encoded already (a cached listing)."""
        self.set_status(status)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(body)

    def send_api_error(self, error: ApiError) -> None:
        self.clear()
        self.set_default_headers()
        self.set_status(error.status)
        for name, value in error.headers.items():
            self.set_header(name, value)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        if error.status >= 500 and self.error_style != "ollama":
            # The openai and anthropic SDKs resend 5xx answers by themselves.
            self.set_header("x-should-retry", "false")
        self.finish(error_body(self.error_style, error.message, error.status))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, tornado.web.HTTPError) and exc.log_message:
            message = exc.log_message % exc.args if exc.args else exc.log_message
        elif status_code == 405:
            message = "405 method not allowed"
        elif status_code >= 500:
            message = "internal error"
        else:
            message = self._reason
        if status_code == 405:
            self.set_header("Allow", ", ".join(self.allowed_methods()))
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(error_body(self.error_style, message, status_code))

    def allowed_methods(self) -> list[str]:
        """The methods this handler class answers (RFC 9110 wants them in
        the `Allow` header of a 405)."""
        default = tornado.web.RequestHandler
        return [m for m in self.SUPPORTED_METHODS
                if getattr(type(self), m.lower(), None) is not getattr(default, m.lower(), None)]

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, tornado.web.HTTPError):
            log.debug("%d %s: %s", value.status_code, self.request.uri, value)
        else:
            super().log_exception(typ, value, tb)

    def _handle_request_exception(self, e: BaseException) -> None:
        unavailable = store.unavailable(e)
        if unavailable is not None:
            message, retry_after = unavailable
            log.warning("%s %s: %s", self.request.method, self.request.uri, e)
            e = ApiError(503, message, {"Retry-After": str(retry_after)})
        if isinstance(e, ApiError):
            if not self._finished:
                self.send_api_error(e)
            return
        super()._handle_request_exception(e)

    async def json_body(self) -> dict[str, Any]:
        """The request body as a JSON object, or a 400 in Ollama's words."""
        body = self.request.body
        if not body or not body.strip():
            raise ApiError(400, "missing request body")
        try:
            if len(body) > INLINE_JSON_LIMIT:
                data = await asyncio.get_running_loop().run_in_executor(None, json.loads, body)
            else:
                data = json.loads(body)
        except UnicodeDecodeError:
            raise ApiError(400, "invalid request body: not UTF-8") from None
        except RecursionError:
            raise ApiError(400, "invalid request body: nested too deeply") from None
        except ValueError as exc:
            raise ApiError(400, f"invalid JSON in request body: {exc}") from None
        if not isinstance(data, dict):
            raise ApiError(400, "request body must be a JSON object")
        return data


CHANGES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
SECRET_FIELDS = ("password", "key", "token", "refresh", "access", "secret", "_xsrf")


def audit_detail(body: bytes) -> str:
    """What a change asked for, in short: the body's small fields, never a
    secret."""
    if not body or len(body) > 16 * 1024:
        return ""
    try:
        data = json.loads(body)
    except ValueError:
        data = dict(parse_qsl(body.decode("utf-8", "replace")))
    if not isinstance(data, dict):
        return ""
    shown = {k: v for k, v in data.items() if isinstance(k, str)
             and not any(s in k.lower() for s in SECRET_FIELDS)
             and (v is None or isinstance(v, (str, int, float, bool, list)))}
    return json.dumps(shown, separators=(",", ":"), default=str)[:500]


class KeyUser:
    """Whom an admin key acts for when the user who created it is gone."""

    def __init__(self, key: Key) -> None:
        self.id = None
        self.username = f"key:{key.name}"


class InferenceListing(BaseHandler):
    """Listings of what may be inferred with (tags, ps, /v1/models): they
    need a key as inference does under inference_auth "keys"."""

    def prepare(self) -> None:
        self.inference_key()


class NotFoundHandler(BaseHandler):
    """Unknown paths: Ollama's words, in JSON so every client can read them."""

    def prepare(self) -> None:
        raise ApiError(404, "404 page not found")

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        # No such resource, whatever the method: even one Tornado does not
        # know (TRACE) is a 404 here, not a 405 allowing nothing.
        self.set_status(404)
        super().write_error(404)
