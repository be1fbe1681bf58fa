"""OpenAI-shaped errors: {"error": {"message", "type", "code", "param"}} with the right status."""

from __future__ import annotations

import orjson
from starlette.responses import Response

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or _TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
        self.headers = headers or {}


def error_payload(message: str, type: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "code": code, "param": param}}


def error_response(err: APIError) -> Response:
    body = orjson.dumps(error_payload(err.message, err.type, err.code, err.param))
    return Response(body, status_code=err.status, media_type="application/json", headers=err.headers)


def sse_error(message: str, type: str = "api_error", code: str | None = None) -> bytes:
    """An in-stream error event (what OpenAI sends when a stream fails after it started)."""
    return b"data: " + orjson.dumps(error_payload(message, type, code)) + b"\n\n"
