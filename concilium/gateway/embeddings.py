"""POST /v1/embeddings (OpenAI-compatible): answered by the embedding model the request names.

Models marked `kind: embedding` in the policy answer here and nowhere else; the named model (or
alias) answers or the request fails, since vectors from another model cannot be compared with its
own. Keys, budgets (reserved before, settled at the usage reported), retries, the circuit breaker
and metrics apply as to chat. `encoding_format: base64` is the little-endian float32 bytes of each
vector, whatever the provider returned.
"""

from __future__ import annotations

import base64
import time
from typing import Annotated, Any, Literal

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from starlette.requests import Request
from starlette.responses import Response

from concilium.gateway.errors import APIError
from concilium.gateway.headers import plan_headers
from concilium.gateway.requests import no_candidates, read_json, request_id, validate
from concilium.router.decide import DecisionError, decide_embeddings
from concilium.specialists import call
from concilium.specialists.base import ProviderError

Text = Annotated[StrictStr, Field(min_length=1)]
Tokens = Annotated[list[StrictInt], Field(min_length=1)]


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1, max_length=256)
    input: Text | Annotated[list[Text], Field(min_length=1, max_length=2048)] | Tokens | Annotated[
        list[Tokens], Field(min_length=1, max_length=2048)]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: StrictInt | None = Field(None, ge=1)
    user: StrictStr | None = None


def as_floats(vec: Any) -> Any:
    if isinstance(vec, str):
        return np.frombuffer(base64.b64decode(vec), dtype="<f4")
    return vec


def as_base64(vec: Any) -> str:
    if isinstance(vec, str):
        return vec
    return base64.b64encode(np.asarray(vec, dtype="<f4").tobytes()).decode("ascii")


def encoded(data: list[dict[str, Any]], fmt: str) -> list[dict[str, Any]]:
    """The provider's embedding objects with each vector in the format the client asked for."""
    conv = as_base64 if fmt == "base64" else as_floats
    return [{"object": "embedding", "index": d.get("index", i), "embedding": conv(d.get("embedding"))}
            for i, d in enumerate(data)]


def _usage(result: dict[str, Any]) -> dict[str, int]:
    u = result.get("usage") if isinstance(result.get("usage"), dict) else {}
    prompt = int(u.get("prompt_tokens") or 0)
    return {"prompt_tokens": prompt, "total_tokens": int(u.get("total_tokens") or prompt)}


def _error(e: ProviderError | call.AllCandidatesFailed, headers: dict[str, str]) -> APIError:
    if isinstance(e, call.AllCandidatesFailed):
        last = e.last
        status = 429 if last is not None and last.status == 429 else 504 if last is not None and last.status == 504 else 502
        return APIError(status, str(e), code="all_candidates_failed", headers=headers,
                        type="rate_limit_error" if status == 429 else "api_error")
    return APIError(e.status if 400 <= e.status < 600 else 502, e.message, code=e.code, param=e.param, headers=headers)


async def create_embeddings(request: Request) -> Response:
    svc = request.app.state.services
    metrics = svc.metrics
    t0 = time.perf_counter()
    body = await read_json(request)
    validate(EmbeddingRequest, body)
    snap = svc.policy.current
    try:
        plan = decide_embeddings(body, snap.policy, availability=snap.availability, request_id=request_id(request))
    except DecisionError as e:
        raise APIError(e.status, e.message, code=e.code, param=e.param) from None
    body["model"] = plan.requested_model  # an alias: keys and budgets see its target
    if not plan.candidates:
        metrics.requests.labels(plan.requested_model, plan.route, "unavailable").inc()
        raise no_candidates(plan)
    ticket = None
    if svc.guard.active:
        ticket, plan = await svc.guard.admit(request, body, plan, snap, plan_headers(plan))
    try:
        model, result, attempts = await call.embed(plan, body, snap.ctx)
    except (ProviderError, call.AllCandidatesFailed) as e:
        metrics.requests.labels(plan.candidates[0].model, plan.route, "error").inc()
        if ticket is not None:
            ticket.done(None, None, "failed")
        raise _error(e, plan_headers(plan)) from None
    except BaseException:
        if ticket is not None:
            ticket.done(None, None, "cancelled")  # the call may have been paid: keep the reservation
        raise
    usage = _usage(result)
    out = {"object": "list", "data": encoded(result.get("data") or [], body.get("encoding_format") or "float"),
           "model": result.get("model") or model, "usage": usage}
    response = Response(orjson.dumps(out, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json",
                        headers=plan_headers(plan, model))
    metrics.record(model, plan.route, "ok", time.perf_counter() - t0, usage, snap.cost_usd(model, usage))
    if ticket is not None:
        ticket.done(model, usage, "ok")
    return response
