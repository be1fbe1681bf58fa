"""`x-request-id` on every response, as a pure ASGI middleware.

A client's id (up to 128 letters, digits, `-` and `_`) is kept; otherwise one is made here and put
into the request's headers, so every route, the plan and the logs see the same id. Responses that
already name it (the chat route's plan headers) are left as they are; every other response,
errors from the outer middleware included, gets it added.
"""

from __future__ import annotations

import random
from typing import Any

_NAME = b"x-request-id"


def valid_request_id(rid: str) -> bool:
    return 0 < len(rid) <= 128 and rid.isascii() and rid.replace("-", "").replace("_", "").isalnum()


def new_request_id() -> str:
    # 128 random bits as 32 hex digits: a correlation id, not a secret, so no urandom syscall per request.
    return f"{random.getrandbits(128):032x}"


class RequestIdMiddleware:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = scope["headers"]
        rid = None
        for k, v in headers:
            if k == _NAME:
                rid = v
                break
        if rid is None or not valid_request_id(rid.decode("latin-1")):
            rid = new_request_id().encode()
            scope["headers"] = [(k, v) for k, v in headers if k != _NAME] + [(_NAME, rid)]

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                out = message.get("headers") or []
                for k, _ in out:
                    if k == _NAME:
                        break
                else:
                    message["headers"] = [*out, (_NAME, rid)]
            await send(message)

        await self.app(scope, receive, send_with_id)
