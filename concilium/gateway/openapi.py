"""The OpenAPI document: FastAPI's, completed with what the routes do not declare themselves.

The routes read their JSON bodies themselves (`requests.read_json`: cheaper, and the client's own
JSON is passed on), so FastAPI cannot see their bodies or their error statuses. Here every operation
gets its request body, its error responses in OpenAI's error shape, and the media types it really
answers with (`/metrics` is Prometheus text; chat streams are `text/event-stream`).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from concilium.gateway.schemas import (
    ChatCompletionRequest,
    ErrorResponse,
    FeedbackRequest,
    ResponseCreateRequest,
    RouteRequest,
)


def inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """A self-contained schema: each `#/$defs/X` reference replaced by its definition (no cycles here)."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return walk(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(schema)


def body_schema(model: type) -> dict[str, Any]:
    """`openapi_extra` for a route that reads a JSON body of this shape."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": inline_refs(model.model_json_schema())}}}}


_BODIES = {
    ("/v1/chat/completions", "post"): ChatCompletionRequest,
    ("/v1/route", "post"): RouteRequest,
    ("/v1/responses", "post"): ResponseCreateRequest,
    ("/v1/feedback", "post"): FeedbackRequest,
}

_WHY = {
    202: "accepted: the request runs as a background job; poll the response it names",
    400: "the request is invalid (the error's `param` names the field)",
    401: "missing, invalid or disabled API key (when the policy defines keys)",
    403: "the key may not use this model or route",
    404: "unknown model, route or id",
    405: "method not allowed (the `Allow` header lists the allowed ones)",
    409: "the Idempotency-Key was used for another request",
    413: "the request body is larger than the policy's limit",
    415: "the body is not JSON",
    429: "rate limited (a key's limits or every upstream); `retry-after` says when to come back",
    499: "the client went away",
    502: "every candidate model failed",
    503: "no model (or the job queue) can take the request right now",
    504: "every candidate model timed out",
}

_STATUSES: dict[tuple[str, str], tuple[int, ...]] = {
    ("/v1/chat/completions", "post"): (202, 400, 401, 403, 404, 413, 415, 429, 502, 503, 504),
    ("/v1/route", "post"): (400, 401, 403, 404, 413, 415),
    ("/v1/responses", "post"): (400, 401, 403, 404, 409, 413, 415, 429, 503),
    ("/v1/feedback", "post"): (400, 401, 403, 404, 413, 503),
    ("/v1/models/{model_id}", "get"): (401, 404),
    ("/v1/messages", "post"): (202, 400, 401, 403, 404, 413, 415, 429, 502, 503, 504),
    ("/v1/messages/count_tokens", "post"): (400, 401, 404, 413, 415),
    ("/v1/embeddings", "post"): (400, 401, 403, 404, 413, 415, 429, 502, 503, 504),
}

# Errors on /v1/messages... come in Anthropic's shape (gateway/messages.py).
_ANTHROPIC_ERROR = {"type": "object", "required": ["type", "error"], "properties": {
    "type": {"const": "error"},
    "error": {"type": "object", "required": ["type", "message"],
              "properties": {"type": {"type": "string"}, "message": {"type": "string"}}},
    "request_id": {"type": "string"}}}


def _error(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def document(app: FastAPI) -> dict[str, Any]:
    """The app's OpenAPI document (built once, then cached on the app as FastAPI does)."""
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    error = inline_refs(ErrorResponse.model_json_schema())
    for path, item in doc.get("paths", {}).items():
        for method, op in item.items():
            key = (path.replace(":path}", "}"), method)
            if key in _BODIES:
                op.update(body_schema(_BODIES[key]))
            responses = op.setdefault("responses", {})
            anthropic = path.startswith("/v1/messages")
            err, shape = (_ANTHROPIC_ERROR, "Anthropic's") if anthropic else (error, "OpenAI's")
            for status in _STATUSES.get(key, ()):
                if status == 202:
                    responses["202"] = {"description": _WHY[202], "content": {"application/json": {
                        "schema": {"type": "object"}}}}
                else:
                    responses.setdefault(str(status), _error(_WHY[status], err))
            responses.setdefault("4XX", _error(f"a client error, in {shape} error shape", err))
            responses.setdefault("5XX", _error(f"a server error, in {shape} error shape", err))
            responses.pop("422", None)  # FastAPI's validation error: this gateway answers 400
    ok = doc["paths"].get("/metrics", {}).get("get", {}).get("responses", {}).get("200")
    if ok is not None:
        ok["content"] = {"text/plain; version=0.0.4": {"schema": {"type": "string"}}}
    for path in ("/v1/chat/completions", "/v1/responses", "/v1/messages"):
        ok = doc["paths"].get(path, {}).get("post", {}).get("responses", {}).get("200")
        if ok is not None:
            ok.setdefault("content", {})["text/event-stream"] = {"schema": {"type": "string"},
                                                                 "description": "with `stream: true`"}
    app.openapi_schema = doc
    return doc
