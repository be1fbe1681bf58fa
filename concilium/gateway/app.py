"""The FastAPI application: thin routes over the gateway state, OpenAI-shaped errors everywhere."""

from __future__ import annotations

import importlib.util
import logging
import time
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from concilium import __version__
from concilium.gateway.chat import chat_completions, plan_request, read_json, request_id, validate
from concilium.gateway.errors import APIError, error_response
from concilium.gateway.fastpath import FastPath
from concilium.gateway.limits import BodySizeLimit
from concilium.gateway.metrics import Metrics
from concilium.gateway.schemas import ChatCompletionRequest, RouteRequest
from concilium.pipeline.state import PolicyState
from concilium.settings import Settings

log = logging.getLogger("concilium.gateway")

# Optional parts that register their own routes when present.
OPTIONAL_ROUTERS = [
    "concilium.gateway.routes_feedback",
    "concilium.gateway.routes_jobs",
    "concilium.gateway.routes_usage",
]


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
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


def _body_schema(model: type) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": _inline_refs(model.model_json_schema())}}}}


def create_app(settings: Settings | None = None, policy_path: str | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()
    state = PolicyState(policy_path or settings.policy, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.start_background(settings.policy_watch_s)
        await state.start()
        log.info("concilium %s serving policy %s", __version__, state.policy_path)
        yield
        await state.close()

    app = FastAPI(title="Concilium", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible society-of-models gateway")
    app.state.gateway = state
    app.state.metrics = metrics
    app.state.settings = settings
    # Innermost first: the hot endpoint skips routing and dependency solving, not the other middleware.
    app.add_middleware(FastPath, path="/v1/chat/completions")
    app.add_middleware(BodySizeLimit, limit=lambda: state.current.policy.limits.max_body_bytes)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> Response:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> Response:
        return error_response(APIError(exc.status_code, str(exc.detail), code=f"http_{exc.status_code}"))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in first["loc"] if p != "body") or None
        return error_response(APIError(400, f"{param}: {first['msg']}" if param else first["msg"],
                                       param=param, code="invalid_request"))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> Response:
        log.exception("unhandled error")
        return error_response(APIError(500, f"internal error: {type(exc).__name__}", code="internal_error"))

    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"],
                      openapi_extra=_body_schema(ChatCompletionRequest),
                      summary="Create a chat completion (OpenAI-compatible)")

    @app.post("/v1/route", openapi_extra=_body_schema(RouteRequest),
              summary="Dry run: the routing plan for a request, without calling a model")
    async def route(request: Request) -> Response:
        body = await read_json(request)
        validate(RouteRequest, body)
        snap = state.current
        plan = plan_request(snap, body, request_id(request))
        guard = getattr(app.state, "guard", None)
        if guard is not None and guard.active:  # a dry run obeys the key's model and route allow-lists
            _, allowed = guard.check_access(request, body, plan, snap, {})
            plan = plan.model_copy(update={"candidates": allowed})
        return Response(plan.model_dump_json(), media_type="application/json")

    @app.get("/v1/models", summary="The policy's models and the router's virtual models")
    async def models() -> JSONResponse:
        snap = state.current
        now = int(time.time())
        data = [{"id": vm, "object": "model", "created": now, "owned_by": "concilium"}
                for vm in snap.policy.router.virtual_models]
        for name, spec in snap.policy.models.items():
            data.append({"id": name, "object": "model", "created": now, "owned_by": spec.provider,
                         "available": snap.availability(name) is None})
        return JSONResponse({"object": "list", "data": data})

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok", "version": __version__})

    @app.get("/readyz", summary="Readiness: the policy is loaded and its local models are ready")
    async def readyz() -> Response:
        snap = state.current
        waiting = [n for n, p in snap.registry.providers.items()
                   if p.kind == "local" and not p.unavailable_reason() and not getattr(p, "ready", True)]
        body = {"ready": not waiting, "policy_version": snap.version, "loading": waiting,
                "unavailable": {n: r for n in snap.policy.models if (r := snap.availability(n))}}
        return Response(orjson.dumps(body), status_code=200 if not waiting else 503,
                        media_type="application/json")

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    for name in OPTIONAL_ROUTERS:
        if _module_exists(name):
            module = importlib.import_module(name)
            app.include_router(module.router)
            if hasattr(module, "setup"):
                module.setup(app)
    return app
