"""Every request's envelope, as one pure ASGI middleware (outermost): its id and its access log line.

`x-request-id`: a client's id (up to 128 letters, digits, `-` and `_`) is kept; otherwise one is made
here and put into the request's headers, so every route, the plan and the logs see the same id.
Responses that already name it (the chat route's plan headers) are left as they are; every other
response, errors from the outer middleware included, gets it added.

The access log (logger `concilium.access`, level INFO): one line per request with its id, method,
path, status, the key's name, the model and route that answered, the latency to the last byte and
the cost in USD. Never the prompt or the key. Nothing is measured while the logger is off.

With `router.learning` on, a request the online router decided is also written to its decision log
(`pipeline/learning.py`) with its status, the model that answered, its cost and its latency.

`RequestLog`: the same summary of the last answered requests, kept in process for the console
(`/v1/admin/requests`): a bounded deque, one append per request, no lock, no I/O.
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from typing import Any
from urllib.parse import unquote

from concilium.guard.service import STATE_KEY

_NAME = b"x-request-id"
_MODEL = b"x-concilium-model"
_ROUTE = b"x-concilium-route"
COST = "concilium.cost_usd"  # the request's cost so far, in the ASGI scope's state (`add_cost`)
DECISION = "concilium.decision"  # (route, Decision) of a request the online router decided (router.learning)
access = logging.getLogger("concilium.access")


def valid_request_id(rid: str) -> bool:
    return 0 < len(rid) <= 128 and rid.isascii() and rid.replace("-", "").replace("_", "").isalnum()


def new_request_id() -> str:
    # 128 random bits as 32 hex digits: a correlation id, not a secret, so no urandom syscall per request.
    return f"{random.getrandbits(128):032x}"


def add_cost(scope: dict[str, Any], usd: float) -> None:
    """Add a call's cost to the request's total (shown in its access log line)."""
    state = scope.setdefault("state", {})
    state[COST] = state.get(COST, 0.0) + usd


# Requests that answer (and so may get feedback), by path; answered means 200/202, or a model failed.
ANSWERING = frozenset({"/v1/chat/completions", "/v1/responses", "/v1/messages"})


class RequestLog:
    """The last `size` answered requests, newest last, as tuples (unix time, id, path, status, key, model,
    route, seconds, cost in USD): what the access log says of them, never the prompt."""

    FIELDS = ("time", "id", "path", "status", "key", "model", "route", "latency_s", "cost_usd")

    def __init__(self, size: int = 1000) -> None:
        self.entries: deque[tuple] = deque(maxlen=size)  # append is atomic: no lock on the request path


class RequestIdMiddleware:
    def __init__(self, app: Any, recent: Any = None, learning: Any = None, log: RequestLog | None = None) -> None:
        self.app = app
        self.recent = recent  # gateway.recent.RecentRequests: answered request ids, for /v1/feedback
        self.learning = learning  # pipeline.learning.OnlineRouter: logs each routed request's decision
        self.log = log  # the console's last requests

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
        answering = scope["method"] == "POST" and scope["path"] in ANSWERING
        recent = self.recent if answering else None
        learning = self.learning if recent is not None and self.learning is not None and self.learning.enabled else None
        ring = self.log if answering else None
        logging_on = access.isEnabledFor(logging.INFO)
        if not logging_on and learning is None and ring is None:
            return await self.app(scope, receive, self._sender(send, scope, rid, None, recent))
        t0 = time.perf_counter()
        seen: dict[bytes, Any] = {}
        try:
            await self.app(scope, receive, self._sender(send, scope, rid, seen, recent))
        except Exception:
            seen.setdefault(b"status", 500)  # answered by the server-error handler outside
            raise
        finally:
            seconds = time.perf_counter() - t0
            if logging_on:
                self._log(scope, rid, seen, seconds)
            state = scope.get("state") or {}
            model = seen.get(_MODEL)
            if learning is not None and (d := state.get(DECISION)) is not None:
                learning.record(rid.decode("latin-1"), d[0], d[1], seen.get(b"status", 499),
                                unquote(model.decode("latin-1")) if model else None, state.get(COST), seconds)
            if ring is not None:
                route = seen.get(_ROUTE)
                ring.entries.append((time.time(), rid.decode("latin-1"), scope["path"], seen.get(b"status", 499),
                                     getattr(state.get(STATE_KEY), "name", None),
                                     unquote(model.decode("latin-1")) if model else None,
                                     unquote(route.decode("latin-1")) if route else None, seconds, state.get(COST)))

    @staticmethod
    def _sender(send: Any, scope: dict[str, Any], rid: bytes, seen: dict[bytes, Any] | None, recent: Any) -> Any:
        # A plain function handing back `send`'s awaitable, not a coroutine of its own: a streamed
        # response's every body message goes through here, and once the start is out nothing is added.
        def send_with_id(message: dict[str, Any]) -> Any:
            if message["type"] == "http.response.start":
                if recent is not None and (message["status"] in (200, 202) or message["status"] >= 500):
                    state = scope.get("state") or {}
                    key = state.get(STATE_KEY)
                    d = state.get(DECISION)
                    recent.add(rid.decode("latin-1"), key.name if key is not None else "", d[1] if d else None)
                out = message.get("headers") or []
                named = False
                for k, v in out:
                    if k == _NAME:
                        named = True
                    elif seen is not None and (k == _MODEL or k == _ROUTE):
                        seen[k] = v
                if not named:
                    message["headers"] = [*out, (_NAME, rid)]
                if seen is not None:
                    seen[b"status"] = message["status"]
            return send(message)

        return send_with_id

    @staticmethod
    def _log(scope: dict[str, Any], rid: bytes, seen: dict[bytes, Any], seconds: float) -> None:
        state = scope.get("state") or {}
        key = state.get(STATE_KEY)
        cost = state.get(COST)
        path = scope.get("raw_path") or scope.get("path", "-").encode("utf-8", "replace")  # as sent: %-encoded
        access.info("id=%s method=%s path=%s status=%s key=%s model=%s route=%s latency_ms=%.1f cost_usd=%s",
                    rid.decode("latin-1"), scope.get("method", "-"), _field(path),
                    seen.get(b"status", 499),  # nothing was sent: the client went away first
                    getattr(key, "name", None) or "-", _field(seen.get(_MODEL)), _field(seen.get(_ROUTE)),
                    seconds * 1000, f"{cost:.6g}" if cost else "0")


def _field(value: bytes | None) -> str:
    """A header value or a raw path as one log field: any byte that is not printable ASCII, and the
    space, %-encoded (values already are, but for spaces); `-` when absent."""
    if not value:
        return "-"
    text = value.decode("latin-1")
    if text.isascii() and text.isprintable() and " " not in text:
        return text
    return "".join(ch if " " < ch <= "~" else f"%{ord(ch):02X}" for ch in text)
