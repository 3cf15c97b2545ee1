"""Keys, usage and the audit log under /api/proxy (admin token or key).

Thin: aivonx.keys validates, stores and counts; these turn its answers
into JSON (or CSV for the usage). Each method's docstring, after `---`, is
its OpenAPI operation.
"""
from __future__ import annotations

import csv
import datetime
import io
from typing import Any
from urllib.parse import urlencode

from .. import nodes, store
from ..auth import admin_required
from ..errors import ApiError
from ..keys.usage import GROUPS
from .manage import DEFAULT_LIMIT, MAX_LIMIT, ManageHandler


def _key_id(text: str) -> int:
    if len(text) > 18:
        raise ApiError(404, f"key {text[:20]} not found")
    return int(text)


class PagedHandler(ManageHandler):
    def page(self, count: int, limit: int, offset: int) -> dict[str, Any]:
        base = f"{self.request.protocol}://{self.request.host}{self.request.path}"

        def url(at: int) -> str:
            return f"{base}?{urlencode({'limit': limit, 'offset': at})}"
        return {"count": count,
                "next": url(offset + limit) if offset + limit < count else None,
                "previous": url(max(offset - limit, 0)) if offset > 0 else None}


class KeysHandler(PagedHandler):
    @admin_required
    def get(self) -> None:
        """List the keys, paginated; never the keys themselves.
        ---
        tags: [keys]
        summary: List keys
        security: [{bearerAuth: []}]
        parameters:
          - {name: limit, in: query, required: false, schema: {type: integer, minimum: 1, maximum: 1000, default: 100}}
          - {name: offset, in: query, required: false, schema: {type: integer, minimum: 0, default: 0}}
        responses:
          200: {description: A page of keys, content: {application/json: {schema: ApiKeyPage}}}
          400: ValidationFailed
          401: Unauthorized
        """
        limit = self.int_argument("limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
        offset = self.int_argument("offset", 0, 0, 2 ** 62)
        keyring = self.ctx.keys.keyring
        rows = store.ApiKey.select().order_by(store.ApiKey.id).limit(limit).offset(offset)
        self.write_json({**self.page(store.ApiKey.select().count(), limit, offset),
                         "results": [keyring.key_dict(r) for r in rows]})

    @admin_required
    async def post(self) -> None:
        """Create a key; the answer is the only place the key is ever shown.
        ---
        tags: [keys]
        summary: Create a key
        description: >-
          An `inference` key is accepted by the Ollama, OpenAI and Anthropic APIs
          (`Authorization: Bearer <key>` or `x-api-key: <key>`); an `admin` key also by
          the management API and model operations, for tools such as Open WebUI. Only
          the key's SHA-256 is stored: keep the `key` of this answer.
        security: [{bearerAuth: []}]
        requestBody: {required: true, content: {application/json: {schema: ApiKeyInput}}}
        responses:
          201: {description: The key, content: {application/json: {schema: NewApiKey}}}
          400: ValidationFailed
          401: Unauthorized
        """
        row, token = self.ctx.keys.keyring.create(await self.json_body(), self.current_user)
        self.set_header("Location", f"{self.request.path}/{row.id}")
        self.write_json({**self.ctx.keys.keyring.key_dict(row), "key": token}, 201)


class KeyHandler(ManageHandler):
    def _row(self, text: str) -> store.ApiKey:
        try:
            return self.ctx.keys.keyring.get(_key_id(text))
        except LookupError:
            raise ApiError(404, f"key {text} not found") from None

    @admin_required
    def get(self, key_id: str) -> None:
        """One key.
        ---
        tags: [keys]
        summary: Get a key
        security: [{bearerAuth: []}]
        parameters: [{name: key_id, in: path, required: true, schema: {type: integer}}]
        responses:
          200: {description: The key, content: {application/json: {schema: ApiKey}}}
          401: Unauthorized
          404: NotFound
        """
        self.write_json(self.ctx.keys.keyring.key_dict(self._row(key_id)))

    @admin_required
    async def patch(self, key_id: str) -> None:
        """Change a key's name, models, limits, priority or expiry; effective at once.
        ---
        tags: [keys]
        summary: Change a key
        security: [{bearerAuth: []}]
        parameters: [{name: key_id, in: path, required: true, schema: {type: integer}}]
        requestBody: {required: true, content: {application/json: {schema: ApiKeyPatch}}}
        responses:
          200: {description: The key, content: {application/json: {schema: ApiKey}}}
          400: ValidationFailed
          401: Unauthorized
          404: NotFound
        """
        body = await self.json_body()
        row = self._row(key_id)
        self.write_json(self.ctx.keys.keyring.key_dict(
            self.ctx.keys.keyring.update(row.id, body)))

    @admin_required
    def delete(self, key_id: str) -> None:
        """Revoke a key: its next request is refused. Its usage stays.
        ---
        tags: [keys]
        summary: Revoke a key
        security: [{bearerAuth: []}]
        parameters: [{name: key_id, in: path, required: true, schema: {type: integer}}]
        responses:
          204: {description: Revoked}
          401: Unauthorized
          404: NotFound
        """
        self.ctx.keys.keyring.revoke(self._row(key_id).id)
        self.set_status(204)
        self.finish()


def _moment(text: str | None, name: str) -> datetime.datetime | None:
    if not text:
        return None
    try:
        moment = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise nodes.ValidationError({name: "must be an ISO 8601 date or date and time"}) \
            from None
    if moment.tzinfo is not None:
        moment = moment.astimezone(datetime.timezone.utc).replace(tzinfo=None)
    return moment


class UsageHandler(ManageHandler):
    @admin_required
    def get(self) -> None:
        """Usage sums per key, model, hour, day or month.
        ---
        tags: [keys]
        summary: Usage
        description: >-
          Requests, errors, prompt and completion tokens and node time, summed over
          `[from, to)` (UTC; hours are the unit) and grouped by `group_by`. Key id 0 is
          the anonymous key (requests without a key while inference_auth is "open").
          `format=csv` answers a spreadsheet.
        security: [{bearerAuth: []}]
        parameters:
          - {name: from, in: query, required: false, schema: {type: string, format: date-time}}
          - {name: to, in: query, required: false, schema: {type: string, format: date-time}}
          - {name: key_id, in: query, required: false, schema: {type: integer}}
          - {name: model, in: query, required: false, schema: {type: string}}
          - {name: group_by, in: query, required: false, schema: {type: string, default: "key,model"}, description: "Comma-separated: key, model, hour, day, month"}
          - {name: format, in: query, required: false, schema: {type: string, enum: [json, csv]}}
        responses:
          200:
            description: The sums
            content:
              application/json: {schema: UsageReport}
              text/csv: {schema: {type: string}}
          400: ValidationFailed
          401: Unauthorized
        """
        start = _moment(self.get_query_argument("from", None), "from")
        end = _moment(self.get_query_argument("to", None), "to")
        key_id = self.int_argument("key_id", None, 0, 2 ** 62)
        model = self.get_query_argument("model", None) or None
        groups = [g.strip() for g in self.get_query_argument("group_by", "key,model").split(",")
                  if g.strip()]
        wrong = [g for g in groups if g not in GROUPS]
        if wrong:
            raise nodes.ValidationError({"group_by": f"unknown group {wrong[0][:40]!r}; "
                                                     f"valid: {', '.join(GROUPS)}"})
        fmt = self.get_query_argument("format", "json")
        if fmt not in ("json", "csv"):
            raise nodes.ValidationError({"format": "must be json or csv"})
        keys = self.ctx.keys
        keys.flush()  # the latest batch too
        rows = keys.usage.report(start, end, key_id, model, groups, keys.names())
        if fmt == "csv":
            self.set_header("Content-Type", "text/csv; charset=utf-8")
            out = io.StringIO()
            fields = list(rows[0]) if rows else ["requests"]
            writer = csv.DictWriter(out, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
            self.finish(out.getvalue())
            return
        self.write_json({"from": self.get_query_argument("from", None),
                         "to": self.get_query_argument("to", None),
                         "group_by": [g for g in GROUPS if g in groups], "results": rows})


class AuditHandler(PagedHandler):
    @admin_required
    def get(self) -> None:
        """The audit log, newest first, paginated.
        ---
        tags: [keys]
        summary: Audit log
        description: >-
          Every admin change (nodes, config, keys, model operations, status page
          forms) and every refused login: who, from which address, when, what, and
          the answer's status.
        security: [{bearerAuth: []}]
        parameters:
          - {name: limit, in: query, required: false, schema: {type: integer, minimum: 1, maximum: 1000, default: 100}}
          - {name: offset, in: query, required: false, schema: {type: integer, minimum: 0, default: 0}}
        responses:
          200: {description: A page of entries, content: {application/json: {schema: AuditPage}}}
          400: ValidationFailed
          401: Unauthorized
        """
        limit = self.int_argument("limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
        offset = self.int_argument("offset", 0, 0, 2 ** 62)
        audit = self.ctx.keys.audit
        self.ctx.keys.flush()
        self.write_json({**self.page(audit.count(), limit, offset),
                         "results": audit.page(limit, offset)})
