"""The OpenAPI 3 document of the management, account and model-operation
endpoints, assembled by apispec from the handlers' docstrings.

Each documented handler method carries its operation in YAML after `---`;
the shared schemas and canned responses are declared here once and named
from the docstrings (apispec turns a name into a `$ref`).
"""
from __future__ import annotations

from typing import Any, Iterable

from apispec import APISpec
from apispec_webframeworks.tornado import TornadoPlugin

API_VERSION = "1.0.0"

_NULLABLE_NUMBER = {"type": "number", "nullable": True}
_URL_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_LOAD_FACTOR = {"type": "number", "minimum": 1, "maximum": 100, "example": 1.25,
                "description": "cache_aware skips a node more than this factor above the "
                               "candidates' mean in-flight load"}


def _error(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


RESPONSES: dict[str, dict[str, Any]] = {
    "BadRequest": _error("The request is malformed"),
    "Unauthorized": _error("No valid access token (`Authorization: Bearer <access>`)"),
    "NotFound": _error("No such resource"),
    "Conflict": _error("A node with this address and port exists already"),
    "TooManyRequests": _error("Too many failed logins; see the Retry-After header"),
    "Forbidden": _error("Not allowed"),
    "ServerError": _error("The operation failed on some node"),
    "Unavailable": _error("No node is available"),
    "ValidationFailed": {
        "description": "Invalid fields; `fields` says what is wrong with each",
        "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/ValidationError"}}}},
}

NODE_FIELDS = {
    "name": {"type": "string", "maxLength": 100, "example": "gpu1",
             "description": "Defaults to address:port"},
    "address": {"type": "string", "maxLength": 300, "example": "http://10.0.0.5",
                "description": "A host name, an IP, or an http(s) URL (its port, if any, "
                               "is the node's port)"},
    "port": {"type": "integer", "minimum": 1, "maximum": 65535, "example": 11434,
             "default": 11434},
    "active": {"type": "boolean", "default": True,
               "description": "false drains the node: nothing new is routed to it"},
    "slots": {"type": "integer", "minimum": 1, "maximum": 1024, "default": 4, "example": 4,
              "description": "Requests the node serves at once (Ollama's parallelism, "
                             "`OLLAMA_NUM_PARALLEL`); more wait in the proxy's queue"},
    "weight": {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 100,
               "default": 1.0, "example": 1.0,
               "description": "Relative capacity for unequal hardware: a node of weight 3 "
                              "gets three times the share of one of weight 1"},
}

INFERENCE_AUTH = {"type": "string", "enum": ["open", "keys"],
                  "description": "open: anyone who reaches the port may infer; keys: every "
                                 "inference request needs a key"}
_LIMIT = {"type": "integer", "minimum": 1, "maximum": 10 ** 15, "nullable": True}
KEY_FIELDS = {
    "name": {"type": "string", "minLength": 1, "maxLength": 100, "example": "open-webui"},
    "models": {"type": "array", "maxItems": 100, "items": {"type": "string"},
               "example": ["llama3*"],
               "description": "Model names or globs the key may use; empty: every model"},
    "rpm": {**_LIMIT, "description": "Requests per minute (sliding window)"},
    "max_concurrent": {**_LIMIT, "description": "Requests in flight, queued ones included"},
    "daily_tokens": {**_LIMIT, "description": "Prompt + completion tokens per UTC day"},
    "monthly_tokens": {**_LIMIT, "description": "Prompt + completion tokens per UTC month"},
    "priority": {"type": "integer", "minimum": 1, "maximum": 100, "default": 1,
                 "description": "Turns in the wait queue: priority 2 gets two for one"},
    "expires_at": {"type": "string", "format": "date-time", "nullable": True},
}

SCHEMAS: dict[str, dict[str, Any]] = {
    "OpenAIError": {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "properties": {"message": {"type": "string"},
                                         "type": {"type": "string"}}}}},
    "AnthropicError": {"type": "object", "required": ["type", "error"], "properties": {
        "type": {"type": "string", "enum": ["error"]},
        "error": {"type": "object", "properties": {"type": {"type": "string"},
                                                   "message": {"type": "string"}}}}},
    "Error": {"type": "object", "required": ["error"],
              "properties": {"error": {"type": "string"}}},
    "ValidationError": {
        "type": "object", "required": ["error", "fields"],
        "properties": {"error": {"type": "string", "example": "validation failed"},
                       "fields": {"type": "object", "additionalProperties": {"type": "string"},
                                  "example": {"port": "port must be an integer between 1 "
                                                      "and 65535"}}}},
    "Health": {"type": "object", "properties": {"status": {"type": "string",
                                                           "enum": ["healthy"]}}},
    "Status": {"type": "object", "properties": {"status": {"type": "string"}}},
    "ProxyStatus": {"type": "object", "properties": {
        "status": {"type": "string", "enum": ["ok", "unavailable"]},
        "routable_nodes": {"type": "integer"}, "total_nodes": {"type": "integer"},
        "error": {"type": "string"}}},
    "State": {"type": "object", "properties": {
        "active": {"type": "array", "items": {"type": "string"},
                   "description": "URLs of the routable nodes"},
        "standby": {"type": "array", "items": {"type": "string"},
                    "description": "URLs of the nodes down or drained"},
        "node_id_map": _URL_MAP,
        "latencies": {"type": "object", "additionalProperties": _NULLABLE_NUMBER,
                      "description": "Smoothed probe latency in seconds, null while unknown"},
        "active_counts": {"type": "object", "additionalProperties": {"type": "integer"}},
        "models": {"type": "object", "additionalProperties": {
            "type": "array", "items": {"type": "string"}}},
        "loaded_models": {"type": "object", "additionalProperties": {
            "type": "array", "items": {"type": "string"}}},
        "strategy": {"type": "string"},
        "total_active_requests": {"type": "integer"},
        "requests_served": {"type": "integer"},
        "errors": {"type": "integer"},
        "queue": {"$ref": "#/components/schemas/Queue"},
        "cache_affinity": {"type": "object", "description": (
            "cache_aware's decisions: hits sent a request to a node that held its prompt's "
            "prefix or session"), "properties": {
            "hits": {"type": "integer"}, "misses": {"type": "integer"},
            "hit_rate": _NULLABLE_NUMBER}},
        "nodes": {"type": "array", "items": {"$ref": "#/components/schemas/NodeState"},
                  "description": "Every node's details (health, history, counters)"},
        "instance": {"type": "string", "description": "The name of the instance answering"},
        "cluster": {"type": "object", "description": "The instances sharing Redis", "properties": {
            "redis": {"type": "string", "enum": ["off", "connected", "unreachable"]},
            "shared_slots": {"type": "boolean",
                             "description": "Node slots counted cluster-wide (else locally)"},
            "since": {**_NULLABLE_NUMBER, "description": "Unix time Redis last changed state"},
            "instances": {"type": "array", "items": {"type": "string"},
                          "description": "Instances alive, this one included"}}},
        "display": {"$ref": "#/components/schemas/StateDisplay"}}},
    "StateDisplay": {"type": "object", "description": (
        "The cluster as the status page words it: strings to show as they are"), "properties": {
        "summary": {"type": "string", "example": "1 of 2 nodes down"},
        "tone": {"type": "string", "enum": ["ok", "warn", "bad"]},
        "serving": {"type": "string", "description": "Nodes serving", "example": "1"},
        "capacity": {"type": "string", "description": "Slots of the serving nodes"},
        "queue_oldest": {"type": "string", "example": "350 ms"},
        "queue_average": {"type": "string", "example": "4.2 s"},
        "queue_max_wait": {"type": "string", "example": "2m 00s"},
        "cache_hit_rate": {"type": "string", "example": "92% cache hits",
                           "description": "Empty until cache_aware routed a request"}}},
    "NodeDisplay": {"type": "object", "description": (
        "The node as the status page words it: strings to show as they are"), "properties": {
        "since": {"type": "string", "description": "Time since the last status change",
                  "example": "3m 07s"},
        "pool": {"type": "string", "description": "Whether a degraded node still serves",
                 "example": "last resort only"},
        "latency": {"type": "string", "example": "12 ms"},
        "spark": {"type": "string", "description": "SVG polyline points of the latency "
                                                   "history in a 120x28 box"},
        "weight": {"type": "string", "example": "2.5"},
        "weight_label": {"type": "string", "description": "Empty for weight 1",
                         "example": "weight 2.5"}}},
    "Queue": {"type": "object", "description": "Requests waiting for a free slot", "properties": {
        "depth": {"type": "integer", "description": "Requests waiting now"},
        "limit": {"type": "integer", "description": "Most that may wait (--max-queue)"},
        "max_wait": {"type": "number", "description": "Seconds a request may wait (--max-wait)"},
        "oldest_wait": {**_NULLABLE_NUMBER,
                        "description": "Seconds the longest-waiting request has waited"},
        "queued_total": {"type": "integer", "description": "Requests that ever waited"},
        "rejected_total": {"type": "integer",
                           "description": "Requests answered 503: queue full or waited too long"},
        "average_wait": {**_NULLABLE_NUMBER,
                         "description": "Mean seconds waited by the requests that waited"}}},
    "NodeState": {"type": "object", "properties": {
        "id": {"type": "integer"}, "name": {"type": "string"}, "address": {"type": "string"},
        "port": {"type": "integer"}, "url": {"type": "string"},
        "status": {"type": "string", "enum": ["active", "standby", "drained"],
                   "description": "The pool: active nodes are routed to"},
        "health": {"type": "string", "enum": ["healthy", "degraded", "unhealthy", "drained"],
                   "description": "degraded: slow, failing requests or resting after "
                                  "429/503; unhealthy: unreachable; drained: by an admin"},
        "health_reason": {"type": "string",
                          "description": "Why the node is not healthy; empty when it is"},
        "reason": {"type": "string", "description": "The last probe's or failure's word"},
        "since": {"type": "number", "description": "Unix time of the last status change"},
        "enabled": {"type": "boolean"}, "healthy": {"type": "boolean"},
        "latency": _NULLABLE_NUMBER, "last_latency": _NULLABLE_NUMBER,
        "latency_history": {"type": "array", "items": _NULLABLE_NUMBER},
        "version": {"type": "string", "nullable": True},
        "active_requests": {"type": "integer"},
        "slots": {"type": "integer"}, "weight": {"type": "number"},
        "requests_served": {"type": "integer"}, "errors": {"type": "integer"},
        "models": {"type": "array", "items": {"type": "string"}},
        "loaded": {"type": "array", "items": {"type": "string"}},
        "display": {"$ref": "#/components/schemas/NodeDisplay"}}},
    "ActiveNode": {"type": "object", "properties": {
        "id": {"type": "integer"}, "name": {"type": "string"}, "address": {"type": "string"},
        "port": {"type": "integer"}, "url": {"type": "string"},
        "active_requests": {"type": "integer"},
        "status": {"type": "string", "enum": ["active", "standby", "drained"]},
        "latency": _NULLABLE_NUMBER,
        "models": {"type": "array", "items": {"type": "string"}}}},
    "ActiveRequests": {"type": "object", "properties": {
        "nodes": {"type": "array", "items": {"$ref": "#/components/schemas/ActiveNode"}},
        "total_active_requests": {"type": "integer"}}},
    "Config": {"type": "object", "properties": {
        "strategy": {"type": "string"},
        "cache_load_factor": _LOAD_FACTOR,
        "strategies": {"type": "array", "items": {"type": "string"}, "readOnly": True},
        "keep_alive": {"$ref": "#/components/schemas/KeepAlivePolicy"},
        "inference_auth": INFERENCE_AUTH}},
    "ConfigInput": {"type": "object", "required": ["strategy"],
                    "properties": {"strategy": {"type": "string", "example": "cache_aware"},
                                   "cache_load_factor": _LOAD_FACTOR,
                                   "keep_alive": {"$ref": "#/components/schemas/KeepAlivePolicy"},
                                   "inference_auth": INFERENCE_AUTH}},
    "ConfigPatch": {"type": "object",
                    "properties": {"strategy": {"type": "string", "example": "round_robin"},
                                   "cache_load_factor": _LOAD_FACTOR,
                                   "keep_alive": {"$ref": "#/components/schemas/KeepAlivePolicy"},
                                   "inference_auth": INFERENCE_AUTH}},
    "ApiKey": {"type": "object", "properties": {
        "id": {"type": "integer"}, "kind": {"type": "string", "enum": ["inference", "admin"]},
        "prefix": {"type": "string", "description": "The key's first characters, to tell "
                                                     "keys apart; never the key"},
        **KEY_FIELDS,
        "created_at": {"type": "string", "format": "date-time"},
        "last_used_at": {"type": "string", "format": "date-time", "nullable": True},
        "revoked": {"type": "boolean"},
        "revoked_at": {"type": "string", "format": "date-time", "nullable": True}}},
    "NewApiKey": {"allOf": [{"$ref": "#/components/schemas/ApiKey"}, {
        "type": "object", "properties": {"key": {
            "type": "string", "example": "avx_3q2-7wEXAMPLEonly",
            "description": "The key itself: shown in this answer only"}}}]},
    "ApiKeyInput": {"type": "object", "required": ["name"], "properties": {
        "kind": {"type": "string", "enum": ["inference", "admin"], "default": "inference",
                 "description": "inference: the Ollama, OpenAI and Anthropic APIs; admin: "
                                "also the management API and model operations"},
        **KEY_FIELDS}},
    "ApiKeyPatch": {"type": "object", "properties": KEY_FIELDS},
    "ApiKeyPage": {"type": "object", "properties": {
        "count": {"type": "integer"},
        "next": {"type": "string", "nullable": True},
        "previous": {"type": "string", "nullable": True},
        "results": {"type": "array", "items": {"$ref": "#/components/schemas/ApiKey"}}}},
    "UsageReport": {"type": "object", "properties": {
        "from": {"type": "string", "nullable": True}, "to": {"type": "string", "nullable": True},
        "group_by": {"type": "array", "items": {"type": "string"}},
        "results": {"type": "array", "items": {"type": "object", "properties": {
            "key_id": {"type": "integer"}, "key": {"type": "string"},
            "model": {"type": "string"}, "hour": {"type": "string"}, "day": {"type": "string"},
            "month": {"type": "string"},
            "requests": {"type": "integer"}, "errors": {"type": "integer"},
            "prompt_tokens": {"type": "integer"}, "completion_tokens": {"type": "integer"},
            "total_tokens": {"type": "integer"},
            "estimated": {"type": "integer", "description": "Requests whose tokens were "
                                                           "estimated (a /v1 stream without usage)"},
            "node_ms": {"type": "integer"}}}}}},
    "AuditPage": {"type": "object", "properties": {
        "count": {"type": "integer"},
        "next": {"type": "string", "nullable": True},
        "previous": {"type": "string", "nullable": True},
        "results": {"type": "array", "items": {"type": "object", "properties": {
            "id": {"type": "integer"}, "at": {"type": "string", "format": "date-time"},
            "actor": {"type": "string"}, "address": {"type": "string"},
            "action": {"type": "string"}, "status": {"type": "integer"},
            "detail": {"type": "string"}}}}}},
    "KeepAlivePolicy": {
        "type": "object", "additionalProperties": False,
        "description": "How long nodes keep a model loaded: applied to requests to "
                       "/api/generate, /api/chat, /api/embed and /api/embeddings that set no "
                       "keep_alive, or to every one with `enforce`. A number is seconds "
                       "(negative: for ever), a string a duration such as \"5m\" or \"24h\".",
        "properties": {
            "default": {"oneOf": [{"type": "number"}, {"type": "string", "maxLength": 40}],
                        "nullable": True, "example": "30m"},
            "models": {"type": "object", "maxProperties": 500, "example": {"nomic-embed-text": -1},
                       "additionalProperties": {"oneOf": [{"type": "number"},
                                                          {"type": "string", "maxLength": 40}]}},
            "enforce": {"type": "boolean", "default": False}}},
    "Node": {"type": "object", "properties": {
        "id": {"type": "integer"}, **NODE_FIELDS,
        "created_at": {"type": "string", "format": "date-time"}}},
    "NodeInput": {"type": "object", "required": ["address"], "properties": NODE_FIELDS},
    "NodePatch": {"type": "object", "properties": NODE_FIELDS},
    "NodePage": {"type": "object", "properties": {
        "count": {"type": "integer"},
        "next": {"type": "string", "nullable": True},
        "previous": {"type": "string", "nullable": True},
        "results": {"type": "array", "items": {"$ref": "#/components/schemas/Node"}}}},
    "LoginInput": {"type": "object", "required": ["username", "password"], "properties": {
        "username": {"type": "string", "example": "root"},
        "password": {"type": "string", "format": "password"}}},
    "Tokens": {"type": "object", "properties": {
        "access": {"type": "string"}, "refresh": {"type": "string"},
        "token_type": {"type": "string", "example": "Bearer"},
        "expires_in": {"type": "integer", "description": "Seconds the access token lasts"}}},
    "RefreshInput": {"type": "object", "required": ["refresh"],
                     "properties": {"refresh": {"type": "string"}}},
    "LogoutInput": {"type": "object", "properties": {"refresh": {"type": "string"}}},
    "AccessToken": {"type": "object", "properties": {"access": {"type": "string"}}},
    "PullInput": {"type": "object", "required": ["model"], "properties": {
        "model": {"type": "string", "example": "llama3.2"},
        "node_id": {"type": "integer", "description": "Only this node (default: every "
                                                     "routable node)"},
        "stream": {"type": "boolean", "default": True},
        "insecure": {"type": "boolean", "default": False}}},
    "PullProgress": {"type": "object", "description": "One NDJSON line: an Ollama progress "
                     "object tagged with its node, or the final summary",
                     "properties": {"node_id": {"type": "integer"}, "node": {"type": "string"},
                                    "status": {"type": "string"},
                                    "digest": {"type": "string"},
                                    "total": {"type": "integer"},
                                    "completed": {"type": "integer"},
                                    "error": {"type": "string"}}},
    "PullSummary": {"type": "object", "properties": {
        "done": {"type": "boolean"}, "model": {"type": "string"},
        "status": {"type": "string", "enum": ["success", "error"]},
        "error": {"type": "string"},
        "results": {"type": "array", "items": {"type": "object", "properties": {
            "node_id": {"type": "integer"}, "node": {"type": "string"},
            "status": {"type": "string"}, "error": {"type": "string"}}}}}},
    "OllamaModelInput": {"type": "object", "required": ["model"], "properties": {
        "model": {"type": "string"}, "stream": {"type": "boolean", "default": True},
        "insecure": {"type": "boolean"}}},
    "OllamaCreateInput": {"type": "object", "required": ["model"], "properties": {
        "model": {"type": "string"}, "from": {"type": "string"},
        "system": {"type": "string"}, "template": {"type": "string"},
        "stream": {"type": "boolean", "default": True}}},
    "OllamaCopyInput": {"type": "object", "required": ["source", "destination"],
                        "properties": {"source": {"type": "string"},
                                       "destination": {"type": "string"}}},
    "OllamaProgress": {"type": "object", "properties": {
        "status": {"type": "string"}, "digest": {"type": "string"},
        "total": {"type": "integer"}, "completed": {"type": "integer"},
        "error": {"type": "string"}}},
}

TAGS = [
    {"name": "account", "description": "Log in for a bearer token"},
    {"name": "state", "description": "Live cluster state (public)"},
    {"name": "config", "description": "Routing configuration"},
    {"name": "nodes", "description": "The Ollama nodes behind the proxy"},
    {"name": "models", "description": "Model operations across the nodes"},
    {"name": "keys", "description": "Inference and admin keys, their usage, the audit log"},
    {"name": "ollama", "description": "Ollama's own model operations, cluster-wide "
                                      "(admin token required)"},
    {"name": "inference", "description": "Ollama's API and its OpenAI and Anthropic "
                                         "dialects, relayed to a node that has the model: "
                                         "the bodies are Ollama's own (see its docs/api.md, "
                                         "docs/openai.md and Anthropic compatibility page)"},
]

# The relayed inference endpoints: (path, method, summary, streamed content type
# or None, error shape). Bodies and answers are the node's, passed through.
INFERENCE = [
    ("/api/generate", "post", "Generate a completion", "application/x-ndjson", "Error"),
    ("/api/chat", "post", "Chat", "application/x-ndjson", "Error"),
    ("/api/embed", "post", "Embed inputs", None, "Error"),
    ("/api/embeddings", "post", "Embed a prompt (older API)", None, "Error"),
    ("/api/show", "post", "Show a model's details", None, "Error"),
    ("/v1/chat/completions", "post", "OpenAI chat completions", "text/event-stream",
     "OpenAIError"),
    ("/v1/completions", "post", "OpenAI completions", "text/event-stream", "OpenAIError"),
    ("/v1/embeddings", "post", "OpenAI embeddings", None, "OpenAIError"),
    ("/v1/responses", "post", "OpenAI Responses API (stateless)", "text/event-stream",
     "OpenAIError"),
    ("/v1/messages", "post", "Anthropic Messages API", "text/event-stream", "AnthropicError"),
]
# Listings, merged over the nodes that would serve a request now.
LISTINGS = [
    ("/api/tags", "Models the cluster serves (HEAD: 200 as Ollama answers)"),
    ("/api/ps", "Models loaded on the nodes"),
    ("/api/version", "The oldest node's version (HEAD: 200)"),
    ("/v1/models", "Models the cluster serves, OpenAI's shape"),
]
_ANY_OBJECT = {"type": "object", "additionalProperties": True}
_KEY_HEADERS = ("Inference requests may carry a key as `Authorization: Bearer <key>` or "
                "`x-api-key`; it is never forwarded to a node.")


def _inference_operations() -> dict[str, dict[str, Any]]:
    paths: dict[str, dict[str, Any]] = {}
    for path, method, summary, streamed, error in INFERENCE:
        error_response = {"content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{error}"}}}}
        answer: dict[str, Any] = {"application/json": {"schema": _ANY_OBJECT}}
        if streamed:
            answer[streamed] = {"schema": {"type": "string"}}
        paths.setdefault(path, {})[method] = {
            "tags": ["inference"], "summary": summary, "description": _KEY_HEADERS,
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["model"], "additionalProperties": True,
                "properties": {"model": {"type": "string", "example": "llama3"}}}}}},
            "responses": {
                "200": {"description": "The node's answer, streamed as it comes",
                        "content": answer},
                "400": {"description": "Malformed request", **error_response},
                "404": {"description": "No node has the model", **error_response},
                "503": {"description": "The nodes that have the model are down or full "
                                       "(see Retry-After)", **error_response}}}
    for path, summary in LISTINGS:
        ok = {"description": summary,
              "content": {"application/json": {"schema": _ANY_OBJECT}}}
        paths.setdefault(path, {})["get"] = {"tags": ["inference"], "summary": summary,
                                             "responses": {"200": ok}}
    for path in ("/api/tags", "/api/version"):
        paths[path]["head"] = {"tags": ["inference"], "summary": "Ollama's HEAD answer",
                               "responses": {"200": {"description": "OK"}}}
    return paths


def build_spec(routes: Iterable[tuple]) -> dict[str, Any]:
    """The OpenAPI document for the routes whose handlers are documented."""
    spec = APISpec(
        title="Aivonx API", version=API_VERSION, openapi_version="3.0.3",
        plugins=[TornadoPlugin()],
        info={"description": "Manage an Aivonx cluster of Ollama nodes. Log in at "
                             "`/api/account/login`, then send `Authorization: Bearer "
                             "<access>`. Errors are `{\"error\": \"...\"}`."},
        tags=TAGS)
    spec.components.security_scheme("bearerAuth", {"type": "http", "scheme": "bearer"})
    for name, schema in SCHEMAS.items():
        spec.components.schema(name, schema)
    for name, response in RESPONSES.items():
        spec.components.response(name, response)
    for route in routes:
        spec.path(urlspec=route[:2])
    document = spec.to_dict()
    # The Tornado plugin documents handlers from their docstrings; the relayed
    # endpoints share one handler method, so theirs come from the table.
    document["paths"].update(_inference_operations())
    return document
