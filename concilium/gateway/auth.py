"""Authentication as a pure ASGI middleware: every `/v1/` request needs a valid key once the policy
(or the key file) defines keys; the key found is put on `request.state.key`."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from concilium.gateway.errors import APIError, error_response
from concilium.guard.keys import bearer
from concilium.guard.service import STATE_KEY, Guard

_CHALLENGE = {"www-authenticate": "Bearer"}


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for k, v in scope["headers"]:
        if k == name:
            return v.decode("latin-1")
    return None


class AuthMiddleware:
    def __init__(self, app: Any, guard: Guard, metrics: Any = None) -> None:
        self.app = app
        self.guard = guard
        self.metrics = metrics  # counts the 401s (gateway.metrics.Metrics.reject)

    def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Awaitable[None]:
        # A plain function handing back the next layer's (or the refusal's) awaitable: no coroutine
        # of its own for every request to pass through.
        if scope["type"] != "http" or not scope["path"].startswith("/v1/") or not self.guard.active:
            return self.app(scope, receive, send)
        token = bearer(_header(scope, b"authorization")) or _header(scope, b"x-api-key")
        if not token:
            err = APIError(401, "missing API key: send `Authorization: Bearer <key>` (or `x-api-key: <key>`)",
                           code="missing_api_key", type="authentication_error", headers=_CHALLENGE)
            return self._refuse(err, scope, receive, send)
        key = self.guard.table().lookup(token)
        if key is None or key.entry.disabled:
            why = "this API key is disabled" if key is not None else "invalid API key"
            err = APIError(401, why, code="invalid_api_key", type="authentication_error", headers=_CHALLENGE)
            return self._refuse(err, scope, receive, send)
        scope.setdefault("state", {})[STATE_KEY] = key
        return self.app(scope, receive, send)

    async def _refuse(self, err: APIError, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if self.metrics is not None:
            self.metrics.reject(err.status, err.code)
        await error_response(err)(scope, receive, send)
