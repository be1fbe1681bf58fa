"""The console (`/console`) and the read-only admin API it draws from (`/v1/admin/...`, docs/console.md).

Everything here is read from the gateway's own state: the Prometheus registry (`metrics.Metrics`),
the policy state, the guard's limits store, the job store and the last requests (`RequestLog`). Nothing
is computed on the request path; each figure is derived when asked for.

Access: with keys in the policy, the admin API needs a key marked `admin: true` (the auth middleware
has already refused a missing or invalid key with 401; a valid key that is not an admin's gets 403).
The console's page carries the same key in a `concilium_admin` cookie (set by its login form, sent
back as a bearer token by its script). With no keys, everything is open, as the rest of the gateway.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import orjson
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import FileResponse, Response

from concilium.gateway.errors import APIError
from concilium.gateway.request_ids import RequestLog
from concilium.gateway.routes_usage import scope_usage
from concilium.guard.keys import Scope
from concilium.guard.service import STATE_KEY, Guard
from concilium.guard.store import Window

router = APIRouter()
log = logging.getLogger("concilium.gateway")
CONSOLE = Path(__file__).parent / "console"
PUBLIC = frozenset({"login.js", "style.css"})  # what the login page needs; no data in them
COOKIE = "concilium_admin"
CURVES = Path(__file__).resolve().parents[2] / "benchmarks" / "results"  # router_quality_*.png, in a checkout
RATE_WINDOW_S = 30.0
_HEADERS = {"cache-control": "no-store", "x-content-type-options": "nosniff", "x-frame-options": "DENY",
            "content-security-policy": "default-src 'self'; img-src 'self' blob:; frame-ancestors 'none'"}


def _json(obj: Any) -> Response:
    return Response(orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS), media_type="application/json",
                    headers={"cache-control": "no-store"})


def _admin(request: Request) -> None:
    """403 unless the caller's key is an admin's (the middleware has already checked it is a valid key)."""
    guard: Guard = request.app.state.services.guard
    if not guard.active:
        return
    key = request.scope.get("state", {}).get(STATE_KEY)
    if key is None or not key.entry.admin:
        raise APIError(403, "the admin API needs a key with `admin: true` in the policy's keys",
                       code="admin_required", type="permission_error")


# ---------------------------------------------------------------------------------------- console


def _console_access(request: Request) -> int:
    """200 when the console may be shown, else 401 (no or unknown key) or 403 (not an admin's key)."""
    guard: Guard = request.app.state.services.guard
    if not guard.active:
        return 200
    token = unquote(request.cookies.get(COOKIE, ""))
    key = guard.table().lookup(token) if token else None
    if key is None or key.entry.disabled:
        return 401
    return 200 if key.entry.admin else 403


@router.get("/console", include_in_schema=False)
@router.get("/console/", include_in_schema=False)
async def console(request: Request) -> Response:
    status = _console_access(request)
    page = "index.html" if status == 200 else "login.html"
    return FileResponse(CONSOLE / page, status_code=status, headers=_HEADERS, media_type="text/html")


@router.get("/console/{name}", include_in_schema=False)
async def console_asset(request: Request, name: str) -> Response:
    path = CONSOLE / name
    if "/" in name or name.startswith(".") or not path.is_file():
        raise APIError(404, f"no console file {name!r}", code="not_found")
    status = 200 if name in PUBLIC else _console_access(request)
    if status != 200:
        raise APIError(status, "the console needs an admin key: open /console to sign in", code="admin_required")
    return FileResponse(path, headers=_HEADERS)


@router.get("/v1/admin/whoami", summary="Admin: whether the calling key may use the console")
async def whoami(request: Request) -> Response:
    _admin(request)
    key = request.scope.get("state", {}).get(STATE_KEY)
    return _json({"key": key.name if key is not None else None, "admin": True,
                  "keys_enforced": request.app.state.services.guard.active})


# ---------------------------------------------------------------------------------------- traffic


def _samples(metric: Any) -> list[Any]:
    return [s for family in metric.collect() for s in family.samples]


def _quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile: linear within the bucket that holds the q-th observation."""
    buckets = sorted(buckets)
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if math.isinf(upper):
                return lower  # beyond the last finite bucket: its bound is all that is known
            return lower + (upper - lower) * ((rank - below) / (count - below) if count > below else 0.0)
        lower, below = upper, count
    return lower


def _per_model_quantiles(metric: Any) -> dict[str, dict[str, float | None]]:
    """p50 and p99 of a (model, route) histogram, per model (the routes' buckets summed)."""
    buckets: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
    for s in _samples(metric):
        if s.name.endswith("_bucket"):
            buckets[s.labels["model"]][float(s.labels["le"])] += s.value
    return {m: {"p50": _quantile(0.5, list(b.items())), "p99": _quantile(0.99, list(b.items()))}
            for m, b in buckets.items()}


def _counts(metric: Any, *labels: str) -> dict[tuple[str, ...], float]:
    out: dict[tuple[str, ...], float] = defaultdict(float)
    for s in _samples(metric):
        if s.name.endswith("_total"):
            out[tuple(s.labels[k] for k in labels)] += s.value
    return out


def _rate(entries: list[tuple], now: float) -> float:
    """Answered requests per second over the last RATE_WINDOW_S (shorter when the log holds less)."""
    recent = [e for e in entries if e[0] >= now - RATE_WINDOW_S]
    if not recent:
        return 0.0
    span = RATE_WINDOW_S if len(recent) < len(entries) else max(1.0, min(RATE_WINDOW_S, now - recent[0][0]))
    return len(recent) / span


def _cascade(metrics: Any) -> list[dict[str, Any]]:
    by_route: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for (route, outcome), n in _counts(metrics.cascade, "route", "outcome").items():
        by_route[route][outcome] += n
    out = []
    for route, o in sorted(by_route.items()):
        scored = o.get("accepted", 0.0) + o.get("escalated", 0.0)
        out.append({"route": route, "drafts": dict(o),
                    "escalation_rate": o.get("escalated", 0.0) / scored if scored else None})
    return out


@router.get("/v1/admin/traffic", summary="Admin: requests, latency, errors, circuits and cascades, from the "
            "Prometheus registry (since this process started)")
async def traffic(request: Request) -> Response:
    _admin(request)
    svc = request.app.state.services
    m, now = svc.metrics, time.time()
    requests = _counts(m.requests, "model", "route", "status")
    total = sum(requests.values())
    models: dict[str, dict[str, Any]] = defaultdict(lambda: {"requests": 0.0, "errors": 0.0})
    routes: dict[str, float] = defaultdict(float)
    for (model, route, status), n in requests.items():
        models[model]["requests"] += n
        routes[route] += n
        if status != "ok":
            models[model]["errors"] += n
    latency, ttft = _per_model_quantiles(m.latency), _per_model_quantiles(m.ttft)
    for model, row in models.items():
        row["share"] = row["requests"] / total if total else 0.0
        row["latency_s"] = latency.get(model, {"p50": None, "p99": None})
        row["ttft_s"] = ttft.get(model, {"p50": None, "p99": None})
    breakers = svc.policy.breaker.snapshot()
    circuits = {name: {"open": (st := breakers.get(name) or {}).get("open_for_s", 0) > 0,
                       "open_for_s": round(st.get("open_for_s", 0.0), 1), "failures": st.get("failures", 0),
                       "unavailable": svc.policy.current.availability(name)}
                for name in svc.policy.current.policy.models}
    body = {"object": "admin.traffic", "time": now, "requests_total": total,
            "requests_per_s": _rate(list(request.app.state.request_log.entries), now),
            "in_flight": _samples(m.in_flight)[0].value,
            "models": dict(models), "routes": {r: {"requests": n, "share": n / total if total else 0.0}
                                               for r, n in routes.items()},
            "upstream_errors": [{"model": k[0], "code": k[1], "count": n}
                                for k, n in _counts(m.upstream_errors, "model", "code").items()],
            "rejected": [{"status": k[0], "code": k[1], "count": n}
                         for k, n in _counts(m.rejected, "status", "code").items()],
            "fallbacks": {k[0]: n for k, n in _counts(m.fallbacks, "route").items()},
            "circuits": circuits, "cascade": _cascade(m)}
    return _json(body)


@router.get("/v1/admin/requests", summary="Admin: the last answered requests (no prompt text), newest first")
async def requests(request: Request, limit: int = 50, id: str | None = None) -> Response:
    _admin(request)
    rlog: RequestLog = request.app.state.request_log
    entries = [dict(zip(RequestLog.FIELDS, e, strict=True)) for e in reversed(rlog.entries)]
    if id is not None:
        entries = [e for e in entries if e["id"] == id]
    return _json({"object": "list", "data": entries[:max(0, limit)]})


# ---------------------------------------------------------------------------------------- spend


@router.get("/v1/admin/spend", summary="Admin: spend per key, team and model against their budgets, today and "
            "this month")
async def spend(request: Request) -> Response:
    _admin(request)
    svc = request.app.state.services
    guard: Guard = svc.guard
    w, table = Window.at(), guard.table()
    since_start = {k[0]: n for k, n in _counts(svc.metrics.key_spend, "key").items()}
    keys = []
    for key in sorted(table.keys(), key=lambda k: k.name):
        e = key.entry
        keys.append({"key": e.name, "team": e.team, "admin": e.admin, "disabled": e.disabled,
                     "spent_since_start_usd": round(since_start.get(e.name, 0.0), 9),
                     "scopes": [await scope_usage(guard, s, w) for s in key.scopes if s.kind == "key"]})
    teams = [await scope_usage(guard, Scope("team", name, t), w)
             for name, t in sorted(table.teams.items()) if not t.empty]
    caps = [await scope_usage(guard, Scope("model", m.model, m), w) for m in table.section.models if not m.empty]
    models = defaultdict(float)
    for (model,), usd in _counts(svc.metrics.cost, "model").items():
        models[model] += usd
    body = {"object": "admin.spend", "window": {"day": w.day, "month": w.month},
            "keys": keys, "teams": teams, "model_budgets": caps,
            "models": [{"model": m, "spent_since_start_usd": round(v, 9)} for m, v in sorted(models.items())],
            "note": "today and this month are kept for scopes with limits (the guard's store); the figures "
                    "since start are this replica's, from its metrics"}
    if getattr(guard.store, "degraded", False):
        body["degraded"] = "the shared limits store is unreachable; figures are this replica's view"
    return _json(body)


# ---------------------------------------------------------------------------------------- policy


def _artifact(snap: Any) -> dict[str, Any] | None:
    """What the learned router in force was trained as (its router.json), or None without one."""
    d = snap.dispatcher
    if d is None:
        return None
    try:
        meta = json.loads((Path(d.source) / "router.json").read_text())
    except (OSError, ValueError) as e:
        return {"source": d.source, "error": f"router.json unreadable: {type(e).__name__}"}
    return {"source": d.source, "format": meta.get("format"), "version": meta.get("version"),
            "created": meta.get("created"), "categories": meta.get("categories"),
            "models": [m.get("name") for m in meta.get("models", [])]}


def _curves() -> list[str]:
    return sorted(p.name for p in CURVES.glob("router_quality_*.png")) if CURVES.is_dir() else []


@router.get("/v1/admin/policy", summary="Admin: the policy in force, the last refused reload and the router "
            "artifact")
async def policy(request: Request) -> Response:
    _admin(request)
    svc = request.app.state.services
    state, snap = svc.policy, svc.policy.current
    try:
        modified = os.stat(state.policy_path).st_mtime
    except OSError:
        modified = None
    body = {"object": "admin.policy", "path": state.policy_path, "version": snap.version,
            "file_modified_at": modified, "load_error": state.load_error,
            "reloads": {k[0]: n for k, n in _counts(svc.metrics.policy_reloads, "result").items()},
            "models": sorted(snap.policy.models), "routes": [r.name for r in snap.policy.routes],
            "virtual_models": list(snap.policy.router.virtual_models), "keys": len(svc.guard.table()),
            "router": {"learned": snap.policy.router.learned, "artifact": _artifact(snap),
                       "curves": [f"/v1/admin/router/curves/{n}" for n in _curves()]}}
    return _json(body)


@router.get("/v1/admin/router/curves/{name}", summary="Admin: a router evaluation curve (PNG)")
async def curve(request: Request, name: str) -> Response:
    _admin(request)
    if name not in _curves():
        raise APIError(404, f"no evaluation curve {name!r}", code="not_found")
    return FileResponse(CURVES / name, media_type="image/png")


# ---------------------------------------------------------------------------------------- jobs


def _job_summary(job_id: str, rec: dict[str, Any] | None) -> dict[str, Any]:
    """A job record without its request (the spec holds the prompt)."""
    if rec is None:
        return {"id": job_id, "status": "expired"}
    plan = (rec.get("spec") or {}).get("plan") or {}
    return {"id": job_id, "status": rec["status"], "owner": rec.get("owner"), "model": rec.get("model") or None,
            "route": plan.get("route"), "attempts": rec.get("attempts"), "worker": rec.get("worker") or None,
            "started_at": rec.get("started_at") or None, "events": rec.get("seq", -1) + 1}


@router.get("/v1/admin/jobs", summary="Admin: job queues, submissions and the jobs that ended")
async def jobs(request: Request, limit: int = 50) -> Response:
    _admin(request)
    svc = request.app.state.services
    try:
        depths: dict[str, int] | None = await asyncio.wait_for(asyncio.to_thread(svc.jobs.queue_depths), 2.0)
    except Exception as e:
        log.debug("job queue depth unavailable: %s", type(e).__name__)
        depths = None
    bills = (await svc.jobs.store.bills())[-limit:] if limit > 0 else []
    ended = [_job_summary(b["job_id"], await svc.jobs.store.get(b["job_id"])) | {"bill_model": b.get("model")}
             for b in reversed(bills)]
    body = {"object": "admin.jobs", "queued": depths,
            "submitted": [{"kind": k[0], "route": k[1], "count": n}
                          for k, n in _counts(svc.metrics.jobs_submitted, "kind", "route").items()],
            "ended": ended,
            "listing": "the job store keeps no index of queued or running jobs: `queued` counts them per queue, "
                       "`ended` lists the billed ones; GET /v1/admin/jobs/{id} shows any job by id"}
    return _json(body)


@router.get("/v1/admin/jobs/{job_id}", summary="Admin: one job's status and events (types, not text)")
async def job(request: Request, job_id: str) -> Response:
    _admin(request)
    store = request.app.state.services.jobs.store
    rec = await store.get(job_id)
    if rec is None:
        raise APIError(404, f"No job found with id '{job_id}'.", code="job_not_found")
    events = [{"seq": ev.seq, "type": ev.type} for ev in await store.all_events(job_id)]
    return _json(_job_summary(job_id, rec) | {"events_list": events})
