"""The FastAPI application: thin routes over the gateway state, OpenAI-shaped errors everywhere."""

from __future__ import annotations

import asyncio
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
from concilium.gateway import (
    admin,
    anthropic,
    embeddings,
    messages,
    routes_feedback,
    routes_jobs,
    routes_usage,
)
from concilium.gateway.auth import AuthMiddleware
from concilium.gateway.chat import chat_completions
from concilium.gateway.errors import APIError, error_response
from concilium.gateway.fastpath import FastPath
from concilium.gateway.limits import BodySizeLimit
from concilium.gateway.openapi import body_schema, document
from concilium.gateway.request_ids import RequestIdMiddleware, RequestLog
from concilium.gateway.requests import plan_request, read_json, request_id, validate
from concilium.gateway.routes_jobs import jobs_unavailable
from concilium.gateway.schemas import ChatCompletionRequest, RouteRequest
from concilium.gateway.services import Services
from concilium.settings import Settings
from concilium.workers.store import StoreUnavailable

log = logging.getLogger("concilium.gateway")


def create_app(settings: Settings | None = None, policy_path: str | None = None) -> FastAPI:
    """The composition root: every service is built here, started and closed by the lifespan, and
    handed to the routes (`services.Services`)."""
    settings = settings or Settings()
    svc = Services.build(settings, policy_path or settings.policy)
    state, metrics = svc.policy, svc.metrics

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await svc.start()
        log.info("concilium %s serving policy %s", __version__, state.policy_path)
        try:
            yield
        finally:
            await svc.close()

    app = FastAPI(title="Concilium", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible society-of-models gateway")
    app.state.services = svc
    # Innermost first: the hot endpoint skips routing and dependency solving, not the other middleware.
    app.add_middleware(FastPath, path="/v1/chat/completions")
    app.add_middleware(BodySizeLimit, limit=lambda: state.current.policy.limits.max_body_bytes)
    app.add_middleware(AuthMiddleware, guard=svc.guard, metrics=metrics)  # a request without a valid key goes no further
    app.add_middleware(messages.AnthropicErrors)  # /v1/messages answers every error in Anthropic's shape
    app.state.request_log = RequestLog()  # the console's last requests (admin.py)
    app.add_middleware(RequestIdMiddleware, recent=svc.recent, learning=svc.learning,
                       log=app.state.request_log)  # outermost: every response names its request id

    metrics.watch_breakers(state)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> Response:
        metrics.reject(exc.status, exc.code)
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> Response:
        return error_response(APIError(exc.status_code, str(exc.detail), code=f"http_{exc.status_code}",
                                       headers=dict(exc.headers or {})))  # e.g. the 405's Allow

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in first["loc"] if p != "body") or None
        return error_response(APIError(400, f"{param}: {first['msg']}" if param else first["msg"],
                                       param=param, code="invalid_request"))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error")
        return error_response(APIError(500, f"internal error: {type(exc).__name__}", code="internal_error",
                                       headers={"x-request-id": request_id(request)}))

    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"],
                      openapi_extra=body_schema(ChatCompletionRequest),
                      summary="Create a chat completion (OpenAI-compatible)")
    app.add_api_route(messages.PATH, messages.create_message, methods=["POST"],
                      openapi_extra=body_schema(anthropic.MessagesRequest),
                      summary="Create a message (Anthropic Messages API), answered by the chat pipeline")
    app.add_api_route("/v1/embeddings", embeddings.create_embeddings, methods=["POST"],
                      openapi_extra=body_schema(embeddings.EmbeddingRequest),
                      summary="Create embeddings (OpenAI-compatible) with a model the policy marks `kind: embedding`")
    app.add_api_route(messages.PATH + "/count_tokens", messages.count_tokens, methods=["POST"],
                      openapi_extra=body_schema(anthropic.CountTokensRequest),
                      summary="Estimate a message request's input tokens (from its length, no tokenizer)")

    @app.post("/v1/route", openapi_extra=body_schema(RouteRequest),
              summary="Dry run: the routing plan for a request, without calling a model")
    async def route(request: Request) -> Response:
        body = await read_json(request)
        validate(RouteRequest, body)
        snap = state.current
        plan = plan_request(snap, body, request_id(request), svc.learning)
        if svc.guard.active:  # a dry run obeys the key's model and route allow-lists
            _, allowed = svc.guard.check_access(request, body, plan, snap, {})
            plan = plan.model_copy(update={"candidates": allowed})
        return Response(plan.model_dump_json(), media_type="application/json")

    def model_card(name: str, now: int) -> dict[str, Any] | None:
        snap = state.current
        if name in snap.policy.router.virtual_models:
            return {"id": name, "object": "model", "created": now, "owned_by": "concilium"}
        if name in snap.policy.aliases:  # another name for a model or virtual model
            target = snap.policy.aliases[name]
            card = model_card(target, now)
            return card and {**card, "id": name, "alias_for": target}
        spec = snap.policy.models.get(name)
        if spec is None:
            return None
        card = {"id": name, "object": "model", "created": now, "owned_by": spec.provider,
                "available": snap.availability(name) is None}
        return {**card, "kind": "embedding"} if spec.kind == "embedding" else card

    @app.get("/v1/models", summary="The policy's models, the router's virtual models and the aliases")
    async def models() -> JSONResponse:
        snap, now = state.current, int(time.time())
        names = [*snap.policy.router.virtual_models, *(n for n in snap.policy.models
                                                         if n not in snap.policy.router.virtual_models),
                 *snap.policy.aliases]
        return JSONResponse({"object": "list", "data": [model_card(n, now) for n in names]})

    @app.get("/v1/models/{model_id:path}", summary="One model or virtual model (OpenAI's model object)")
    async def model(model_id: str) -> JSONResponse:
        card = model_card(model_id, int(time.time()))
        if card is None:
            raise APIError(404, f"The model {model_id!r} does not exist; GET /v1/models lists the models",
                           code="model_not_found", param="model")
        return JSONResponse(card)

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok", "version": __version__})

    @app.get("/readyz", summary="Readiness: the policy is loaded and its local models are ready")
    async def readyz() -> Response:
        snap = state.current
        local = [(n, p) for n, p in snap.registry.providers.items() if p.kind == "local"]
        failed = {n: why for n, p in local if (why := p.unavailable_reason())}  # a load that failed
        waiting = [n for n, p in local if n not in failed and not getattr(p, "ready", True)]
        body = {"ready": not waiting and not failed, "policy_version": snap.version, "loading": waiting,
                "failed": failed, "unavailable": {n: r for n in snap.policy.models if (r := snap.availability(n))}}
        if state.load_error is not None:  # the file on disk was refused; the version above still serves
            body["policy_error"] = state.load_error
        return Response(orjson.dumps(body), status_code=200 if body["ready"] else 503,
                        media_type="application/json")

    @app.get("/v1/router/learning", summary="The online router (router.learning): which router is live, how much "
             "it has learned, and what the decision log says of each router")
    async def learning_status() -> Response:
        online = svc.learning
        body = {"enabled": online.enabled, "live": online.live, "events": int(online.events),
                "models": {m: int(st.n) for m, st in sorted(online.learner.stats.items())},
                "estimates": online.estimates() if online.enabled else None}
        return Response(orjson.dumps(body), media_type="application/json")

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus() -> Response:
        try:  # the job queues' depth, from the broker (skipped, with the last values, when it is down)
            for queue, n in (await asyncio.wait_for(asyncio.to_thread(svc.jobs.queue_depths), 2.0)).items():
                metrics.child(metrics.jobs_queued, queue).set(n)
        except Exception as e:
            log.debug("job queue depth unavailable: %s", type(e).__name__)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(StoreUnavailable)
    async def _jobs_down(_: Request, exc: StoreUnavailable) -> Response:
        return error_response(jobs_unavailable(exc))

    for module in (routes_feedback, routes_jobs, routes_usage, admin):
        app.include_router(module.router)
    app.openapi = lambda: document(app)  # request bodies, error statuses and media types the routes do not declare
    return app
