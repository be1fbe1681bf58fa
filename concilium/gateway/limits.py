"""Request body size limit as a pure ASGI middleware.

A declared Content-Length over the limit is refused before the body is read; a chunked body is
counted as it arrives and refused (413, OpenAI error JSON) as soon as it passes the limit.
"""

from __future__ import annotations

from collections.abc import Callable

from concilium.gateway.errors import APIError, error_response


def _too_large(limit: int) -> APIError:
    return APIError(413, f"request body is larger than the limit of {limit} bytes", code="request_too_large")


class BodySizeLimit:
    def __init__(self, app, limit: Callable[[], int]) -> None:
        self.app = app
        self.limit = limit

    def __call__(self, scope, receive, send):
        # A plain function handing back the next layer's awaitable: no coroutine of its own per request.
        if scope["type"] != "http":
            return self.app(scope, receive, send)
        limit = self.limit()
        for k, v in scope["headers"]:
            if k == b"content-length":
                if v.isdigit() and int(v) > limit:
                    return error_response(_too_large(limit))(scope, receive, send)
                break
        seen = 0

        async def limited_receive():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise _too_large(limit)  # turned into a 413 by the app's APIError handler
            return msg

        return self.app(scope, limited_receive, send)
