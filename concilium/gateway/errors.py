"""OpenAI-shaped errors on the wire: {"error": {"message", "type", "code", "param"}} with the right
status, as a JSON response or as an in-stream event. The error value itself is `core.errors.APIError`."""

from __future__ import annotations

import orjson
from starlette.responses import Response

from concilium.core.errors import APIError, error_payload

__all__ = ["APIError", "error_payload", "error_response", "sse_error"]


def error_response(err: APIError) -> Response:
    body = orjson.dumps(error_payload(err.message, err.type, err.code, err.param))
    return Response(body, status_code=err.status, media_type="application/json", headers=err.headers)


def sse_error(message: str, type: str = "api_error", code: str | None = None) -> bytes:
    """An in-stream error event (what OpenAI sends when a stream fails after it started)."""
    return b"data: " + orjson.dumps(error_payload(message, type, code)) + b"\n\n"
