"""GET /v1/usage: a key's own spend and limits."""

from __future__ import annotations

import orjson
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from concilium.gateway.errors import APIError
from concilium.guard.keys import Scope
from concilium.guard.service import STATE_KEY, Guard
from concilium.guard.store import Window

router = APIRouter()


async def scope_usage(guard: Guard, s: Scope, w: Window) -> dict:
    b, r = s.limits.budget, s.limits.rate
    u = await guard.store.usage(s.name, r.requests_per_min if r else None, r.tokens_per_min if r else None, w)
    out: dict = {"scope": s.kind, "id": s.id,
                 "spent_usd": {"day": u.spent_day / 1e9, "month": u.spent_month / 1e9},
                 "reserved_usd": u.reserved / 1e9,
                 "window": {"day": w.day, "month": w.month, "day_resets_in_s": round(w.seconds_to_day_end()),
                            "month_resets_in_s": round(w.seconds_to_month_end())}}
    if b is not None:
        out["budget_usd"] = {"day": b.usd_per_day, "month": b.usd_per_month}
    if r is not None:
        out["rate"] = {"requests_per_min": r.requests_per_min, "tokens_per_min": r.tokens_per_min,
                       "requests_available": None if u.requests_left is None else max(0, int(u.requests_left)),
                       "tokens_available": None if u.tokens_left is None else int(u.tokens_left)}
    return out


@router.get("/v1/usage", summary="The calling key's spend, reservations and limits")
async def usage(request: Request) -> Response:
    guard: Guard = request.app.state.services.guard
    key = request.scope.get("state", {}).get(STATE_KEY)
    if key is None:
        raise APIError(404, "usage is tracked per API key, and this gateway's policy defines no keys",
                       code="no_keys")
    w = Window.at()
    scopes = list(key.scopes) + [s for ss in key.model_scopes.values() for s in ss]
    e = key.entry
    body = {"object": "usage", "key": e.name, "team": e.team, "models": e.models, "routes": e.routes,
            "scopes": [await scope_usage(guard, s, w) for s in scopes]}
    if getattr(guard.store, "degraded", False):
        body["degraded"] = "the shared limits store is unreachable; figures are this replica's view"
    return Response(orjson.dumps(body), media_type="application/json")
