"""The hot endpoint without the framework's per-request routing machinery.

`POST /v1/chat/completions` stays an ordinary FastAPI route (so it is in the OpenAPI schema and
any request the fast path does not take is served as before), but this ASGI middleware, installed
innermost among the app's middleware, answers it directly: the request still passes through every
middleware of the app (the body size limit, anything added later) and its server-error handler, and
the same endpoint function and exception handlers run. What it skips is route matching, the
exception middleware's and FastAPI's per-request wrappers and dependency solving, which together
cost more CPU than the rest of a proxied request.

It only does this while the route's endpoint needs nothing but the `Request`: if the route ever
gets dependencies or parameters (auth as a `Depends`, say), the fast path steps aside by itself.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger("concilium.gateway")

Endpoint = Callable[[Request], Awaitable[Response]]


def _plain_endpoint(app: Any, path: str, method: str) -> Endpoint | None:
    """The route's endpoint if FastAPI would call it with just the request, else None."""
    for route in getattr(app, "routes", ()):
        if getattr(route, "path", None) != path or method not in (getattr(route, "methods", None) or ()):
            continue
        dep = getattr(route, "dependant", None)
        if dep is None or not dep.request_param_name:
            return None
        extra = (dep.dependencies, dep.path_params, dep.query_params, dep.header_params, dep.cookie_params,
                 dep.body_params)
        if any(extra) or dep.response_param_name or dep.background_tasks_param_name:
            return None
        if getattr(app, "dependency_overrides", None):
            return None
        return dep.call
    return None


def _lookup_handler(handlers: dict[Any, Callable], exc: Exception) -> Callable | None:
    """The app's handler for `exc`, as Starlette's exception middleware would find it.

    The catch-all (Exception / 500) handler is left to the server-error middleware outside us.
    """
    if isinstance(exc, HTTPException) and exc.status_code in handlers and exc.status_code != 500:
        return handlers[exc.status_code]
    for cls in type(exc).__mro__:
        if cls is Exception:
            return None
        if cls in handlers:
            return handlers[cls]
    return None


def _is_async(fn: Any) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or (callable(fn) and inspect.iscoroutinefunction(fn.__call__))


class FastPath:
    def __init__(self, app: ASGIApp, path: str, method: str = "POST") -> None:
        self.app = app
        self.path = path
        self.method = method
        self._endpoint: Endpoint | None = None
        self._checked_for: Any = None

    def _endpoint_for(self, app: Any) -> Endpoint | None:
        if self._checked_for is not app:
            self._endpoint = _plain_endpoint(app, self.path, self.method)
            self._checked_for = app
            if self._endpoint is None:
                log.info("fast path for %s %s disabled: the route needs more than the request",
                         self.method, self.path)
        return self._endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope["path"] != self.path or scope["method"] != self.method
                or scope.get("root_path")):
            return await self.app(scope, receive, send)
        app = scope.get("app")
        endpoint = self._endpoint_for(app)
        if endpoint is None:
            return await self.app(scope, receive, send)
        request = Request(scope, receive, send)
        try:
            response = await endpoint(request)
        except Exception as exc:
            handler = _lookup_handler(app.exception_handlers, exc)
            if handler is None:
                raise
            if _is_async(handler):
                response = await handler(request, exc)
            else:
                response = await run_in_threadpool(handler, request, exc)
            exc.__traceback__ = None
            if response is None:
                return
        await response(scope, receive, send)
