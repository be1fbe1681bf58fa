"""What every request route does first: its id, its JSON body, its plan."""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import ValidationError
from starlette.requests import Request

from concilium.core import tracing
from concilium.core.plan import RoutePlan
from concilium.gateway.errors import APIError
from concilium.gateway.headers import plan_headers
from concilium.gateway.request_ids import new_request_id, valid_request_id
from concilium.guard import privacy
from concilium.pipeline.state import Snapshot
from concilium.router.decide import DecisionError, decide


def request_header(request: Request, name: bytes) -> str | None:
    """The first value of a (lower-case) request header, as `request.headers.get` would give it,
    read straight from the ASGI scope (no Headers object, no KeyError for a missing header)."""
    for k, v in request.scope["headers"]:
        if k == name:
            return v.decode("latin-1")
    return None


def request_id(request: Request) -> str:
    """The request's id: the client's, else the one `RequestIdMiddleware` made (or a new one)."""
    rid = request_header(request, b"x-request-id")
    if rid and valid_request_id(rid):
        return rid
    return new_request_id()


def is_json_media_type(ctype: str) -> bool:
    """`application/json` or a `+json` type (`application/vnd.api+json`), any case, any parameters."""
    media = ctype.partition(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def read_json(request: Request) -> dict[str, Any]:
    ctype = request_header(request, b"content-type")
    if ctype is not None and ctype != "application/json" and not is_json_media_type(ctype):
        raise APIError(415, f"expected an application/json body, got content-type {ctype!r}",
                       code="unsupported_media_type")
    raw = await request.body()
    if not raw:
        raise APIError(400, "the request body is empty; expected a JSON object", code="invalid_json")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise APIError(400, f"could not parse the JSON body: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"expected a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


def validate(model: type, body: dict[str, Any]) -> None:
    try:
        model.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise APIError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param,
                       code="invalid_request") from None


def plan_request(snap: Snapshot, body: dict[str, Any], rid: str, online: Any = None) -> RoutePlan:
    """The request's plan; `online` is the OnlineRouter (router.learning), consulted when enabled."""
    with tracing.span("concilium.decide") as sp:
        pii = privacy.verdict(body, snap.policy, rid)  # None unless the policy routes on PII
        try:
            plan = decide(body, snap.policy, dispatcher=snap.dispatcher, availability=snap.availability,
                          windows=snap.context_limit, features=snap.unsupported, request_id=rid, pii=pii,
                          online=online)
        except DecisionError as e:
            raise APIError(e.status, e.message, code=e.code, param=e.param) from None
        if plan.requested_model != body.get("model"):  # an alias: keys, budgets and jobs see its target
            body["model"] = plan.requested_model
        plan = privacy.restrict(plan, snap.policy, pii)
        if tracing.ENABLED:
            sp.set_attributes({"concilium.route": plan.route, "concilium.strategy": plan.strategy,
                               "gen_ai.request.model": plan.requested_model,
                               "concilium.candidates": [c.model for c in plan.candidates]})
        return plan


def no_candidates(plan: RoutePlan) -> APIError:
    why = "; ".join(f"{s.model}: {s.reason}" for s in plan.skipped) or "the route lists no callable model"
    if plan.route == "pinned":  # answered by that model or not at all, unless fallbacks were asked for
        return APIError(503, f"the model {plan.requested_model!r} cannot answer this request right now ({why}); "
                        "a request that names a model is answered by that model only: list other models in "
                        "`fallbacks` (or `models`), or ask for a virtual model to let the router choose",
                        code="model_unavailable", param="model", headers=plan_headers(plan))
    return APIError(503, f"no model can answer this request right now ({why})", code="no_available_model",
                    headers=plan_headers(plan))


