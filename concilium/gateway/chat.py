"""POST /v1/chat/completions: admit, plan, execute (one model, a cascade, a fusion or chain, or a
background job) and settle, answering in OpenAI's shapes.

This route stays a plain Starlette-style endpoint that takes only the `Request` (see fastpath.py:
FastAPI's dependency solving costs more CPU than the rest of a proxied request), so it reads the
app's services from `request.app.state.services` instead of `Depends`."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from concilium.core import tracing
from concilium.core.plan import RoutePlan
from concilium.gateway import caching, routes_jobs
from concilium.gateway.errors import APIError, sse_error
from concilium.gateway.headers import header_value, plan_headers
from concilium.gateway.request_ids import COST, DECISION, add_cost
from concilium.gateway.requests import (
    no_candidates,
    plan_request,
    read_json,
    request_header,
    request_id,
    validate,
)
from concilium.gateway.responses import EventStreamResponse
from concilium.gateway.schemas import ChatCompletionRequest
from concilium.pipeline import cascade
from concilium.pipeline.state import Snapshot
from concilium.specialists import call
from concilium.specialists.base import CONTEXT_LENGTH_EXCEEDED, ProviderError

_DONE = b"data: [DONE]\n\n"


def provider_error(e: ProviderError | call.AllCandidatesFailed, plan: RoutePlan) -> APIError:
    if isinstance(e, call.AllCandidatesFailed):
        last = e.last
        if e.attempts and all(a.code == CONTEXT_LENGTH_EXCEEDED for a in e.attempts):
            # every model tried said the prompt is too long: the request, not the models, must change
            return APIError(400, str(e), code=CONTEXT_LENGTH_EXCEEDED, param="messages", headers=plan_headers(plan))
        status = 429 if last is not None and last.status == 429 else 502
        if last is not None and last.status == 504:
            status = 504
        headers = plan_headers(plan)
        if status == 429:  # when to try again: the soonest a model named, else a short default
            headers["retry-after"] = str(max(1, math.ceil(e.retry_after or 1)))
        return APIError(status, str(e), code="all_candidates_failed", headers=headers,
                        type="rate_limit_error" if status == 429 else "api_error")
    return APIError(e.status if 400 <= e.status < 600 else 502, e.message, code=e.code, param=e.param,
                    headers=plan_headers(plan))


def call_cost(request: Request, snap: Snapshot, *call: Any) -> float | None:
    """`snap.cost_usd(*call)`, the cost of one call, added to the request's total for the access log."""
    cost = snap.cost_usd(*call)
    if cost:
        add_cost(request.scope, cost)
    return cost


async def until_disconnect(request: Request) -> None:
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


async def chat_completions(request: Request) -> Response:
    t0 = time.perf_counter()
    body = await read_json(request)
    validate(ChatCompletionRequest, body)
    return await answer(request, body, t0)


async def answer(request: Request, body: dict[str, Any], t0: float | None = None) -> Response:
    """Plan, admit, execute and settle one chat request that has been read and validated: the chat
    route's own, or one translated from another API (`messages.py`, Anthropic's Messages)."""
    if tracing.ENABLED:
        return await _traced(request, body, t0)
    return await _answer(request, body, t0)


SPAN = "concilium.span"  # the request's server span, in the ASGI scope's state (tracing on)


async def _traced(request: Request, body: dict[str, Any], t0: float | None) -> Response:
    """`_answer` inside the request's server span; a stream's span ends with the stream."""
    model = str(body.get("model"))
    sp = tracing.start(f"chat {model}", "server", {"gen_ai.operation.name": "chat", "gen_ai.request.model": model})
    request.scope.setdefault("state", {})[SPAN] = sp
    try:
        with tracing.use(sp):
            resp = await _answer(request, body, t0)
    except BaseException as e:
        _trace_response(request, sp, getattr(e, "status", 500), getattr(e, "headers", None) or {})
        tracing.failed(sp, e)
        sp.end()
        raise
    _trace_response(request, sp, resp.status_code, resp.headers)
    if not isinstance(resp, StreamingResponse):
        if resp.media_type == "application/json" and resp.status_code == 200:
            sp.set_attributes(tracing.usage_attributes(orjson.loads(resp.body).get("usage")))
        sp.end()
        return resp
    inner, close = resp.body_iterator, getattr(resp, "on_close", None)

    def end() -> None:
        if sp.end_time is None:
            if cost := request.scope["state"].get(COST):
                sp.set_attribute("concilium.cost_usd", cost)
            sp.end()

    async def ending() -> AsyncIterator[Any]:
        try:
            async for part in inner:
                yield part
        finally:
            end()

    async def on_close() -> None:  # also when the stream never started
        try:
            if close is not None:
                await close()
        finally:
            end()

    resp.body_iterator = ending()
    if isinstance(resp, EventStreamResponse):
        resp.on_close = on_close
    return resp


def _trace_response(request: Request, sp: Any, status: int, headers: Any) -> None:
    attrs = {"http.response.status_code": status}
    for name, key in (("x-concilium-model", "gen_ai.response.model"), ("x-concilium-route", "concilium.route"),
                      ("x-concilium-strategy", "concilium.strategy")):
        if (v := headers.get(name)) is not None:
            attrs[key] = v
    if (cost := request.scope.get("state", {}).get(COST)) is not None:
        attrs["concilium.cost_usd"] = cost
    sp.set_attributes(attrs)


def trace_usage(request: Request, model: str, usage: dict | None) -> None:
    """Tracing on: a stream's answering model and usage, on the request's server span."""
    sp = request.scope.get("state", {}).get(SPAN)
    if sp is not None:
        sp.set_attributes({"gen_ai.response.model": model, **tracing.usage_attributes(usage)})


async def _answer(request: Request, body: dict[str, Any], t0: float | None = None) -> Response:
    svc = request.app.state.services
    metrics = svc.metrics
    t0 = time.perf_counter() if t0 is None else t0
    rid = request_id(request)
    snap: Snapshot = svc.policy.current
    plan = plan_request(snap, body, rid, svc.learning)
    if tracing.ENABLED:  # the server span names the strategy even when no header does
        tracing.current().set_attribute("concilium.strategy", plan.strategy)
    if plan.decision is not None:  # router.learning: logged, and joined to feedback, by request id
        request.scope.setdefault("state", {})[DECISION] = (plan.route, plan.decision)
    if not plan.candidates and plan.strategy != "cascade":
        metrics.requests.labels("none", plan.route, "unavailable").inc()
        raise no_candidates(plan)
    ticket = None
    if svc.guard.active:  # keys: access, rate limits, reserve the maximum cost
        with tracing.span("concilium.admit"):
            ticket, plan = await svc.guard.admit(request, body, plan, snap, plan_headers(plan))
    try:
        if plan.mode == "background" and not routes_jobs.chat_takes(body):
            plan = plan.model_copy(update={"mode": "interactive"})
        if plan.mode == "background":
            resp = await routes_jobs.divert_chat(request, body, plan, snap)
            if ticket is not None:
                ticket.done(None, None, "background")  # charged at the reservation
            return resp
        if plan.strategy == "cascade":
            return await _cascade(request, body, plan, snap, t0, ticket)
        if plan.strategy in ("fusion", "chain"):
            from concilium.gateway import composition

            return await composition.serve(request, body, plan, snap, t0, ticket)
        look = None
        if snap.cache is not None:  # the response cache (a policy without `cache:` pays only this check)
            look = await caching.lookup(request, body, plan, snap, ticket)
            if look.hit is not None:
                response = caching.serve_hit(request, body, plan, look, t0)
                if ticket is not None:
                    ticket.done(None, None, "cached")  # a hit is free
                return response
        if body.get("stream"):
            return await _stream(request, body, plan, snap, t0, ticket, look and look.headers, look)
        return await _complete(request, body, plan, snap, t0, ticket, look and look.headers, look)
    except BaseException:
        if ticket is not None:
            ticket.done(None, None, "failed")  # no answer: release the reservation (no-op once settled)
        raise


async def _complete(request: Request, body: dict, plan: RoutePlan, snap: Snapshot, t0: float,
                    ticket: Any = None, headers: dict[str, str] | None = None,
                    look: caching.Lookup | None = None) -> Response:
    metrics = request.app.state.services.metrics
    task = asyncio.ensure_future(call.complete(plan, body, snap.ctx))
    watcher = asyncio.ensure_future(until_disconnect(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():  # the client went away: stop the upstream call
        task.cancel()
        metrics.requests.labels(plan.candidates[0].model, plan.route, "cancelled").inc()
        if ticket is not None:
            ticket.done(None, None, "cancelled")
        return Response(status_code=499)
    try:
        model, result, attempts = task.result()
    except (ProviderError, call.AllCandidatesFailed) as e:
        metrics.requests.labels(plan.candidates[0].model, plan.route, "error").inc()
        raise provider_error(e, plan) from None
    usage = result.get("usage") if isinstance(result.get("usage"), dict) else None
    # Built before it is counted: a response that cannot be built is a failure, not an "ok".
    response = Response(orjson.dumps(result), media_type="application/json",
                        headers={**plan_headers(plan, model), **(headers or {})})
    elapsed = time.perf_counter() - t0
    metrics.record(model, plan.route, "ok", elapsed, usage, call_cost(request, snap, model, usage, elapsed))
    if ticket is not None:
        ticket.done(model, usage, "ok")
    if attempts:
        metrics.fallbacks.labels(plan.route).inc()
    if look is not None and look.store:
        await caching.save(request, look, model, result)
    return response


async def _stream(request: Request, body: dict, plan: RoutePlan, snap: Snapshot, t0: float,
                  ticket: Any = None, headers: dict[str, str] | None = None,
                  look: caching.Lookup | None = None) -> Response:
    metrics = request.app.state.services.metrics
    try:
        handle = await call.stream(plan, body, snap.ctx)
    except (ProviderError, call.AllCandidatesFailed) as e:
        metrics.requests.labels(plan.candidates[0].model, plan.route, "error").inc()
        raise provider_error(e, plan) from None
    collector = caching.StreamCollector(look) if look is not None and look.store else None
    return _serve_stream(request, body, plan, snap, t0, ticket, handle, headers, collector=collector)


def _serve_stream(request: Request, body: dict, plan: RoutePlan, snap: Snapshot, t0: float, ticket: Any,
                  handle: call.StreamHandle, headers: dict[str, str] | None = None,
                  prior: list[Any] | None = None, collector: caching.StreamCollector | None = None) -> Response:
    """Relay an opened upstream stream; record and settle it (with the request's `prior` calls)."""
    metrics = request.app.state.services.metrics
    metrics.child(metrics.ttft, handle.model, plan.route).observe(time.perf_counter() - t0)
    if handle.attempts:
        metrics.fallbacks.labels(plan.route).inc()
    want_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    finished = False

    async def finish(status: str, usage: dict | None) -> None:
        """Close the upstream, record and settle once: from the relay, or when the response ends
        before the relay ever ran (a client gone before the first byte)."""
        nonlocal finished
        if finished:
            return
        finished = True
        await call._aclose(handle.rest)
        elapsed = time.perf_counter() - t0
        metrics.record(handle.model, plan.route, status, elapsed, usage, call_cost(request, snap, handle.model, usage, elapsed))
        if tracing.ENABLED:
            trace_usage(request, handle.model, usage)
        if ticket is not None:
            ticket.done(handle.model, usage, status, prior or ())
        if collector is not None and status == "ok" and (result := collector.completion()) is not None:
            await caching.save(request, collector.look, handle.model, result)

    return EventStreamResponse(
        relay(handle, want_usage, finish, collector),
        media_type="text/event-stream",
        headers={**plan_headers(plan, handle.model), **(headers or {}), "cache-control": "no-cache"},
        on_close=lambda: finish("cancelled", None),
    )


async def relay(handle: call.StreamHandle, want_usage: bool, finish: Any,
                 collector: caching.StreamCollector | None = None) -> AsyncIterator[bytes]:
    usage: dict | None = None
    status = "ok"
    # Events that arrived together leave together: while the provider says the next event is already
    # here (`ready()`), hold this one, then write them all at once. Same bytes, fewer writes.
    ready = getattr(handle.rest, "ready", None)
    pending: list[bytes] = list(handle.first)
    if collector is not None:
        for ev in pending:
            collector.feed(ev)
    try:
        if pending and not (ready and ready()):
            yield b"".join(pending)
            pending.clear()
        async for ev in handle.rest:
            if collector is not None:
                collector.feed(ev)
            if b'"usage":{' in ev or b'"usage": {' in ev:
                u = orjson.loads(ev[5:]).get("usage")
                if isinstance(u, dict):
                    usage = u
                    if not want_usage and b'"choices":[]' in ev.replace(b" ", b""):
                        ev = b""  # the client did not ask for the usage chunk
            if ev:
                pending.append(ev)
            if pending and not (ready and ready()):
                yield b"".join(pending)
                pending.clear()
        pending.append(_DONE)
        yield b"".join(pending)
    except ProviderError as e:
        status = "error"
        pending.append(sse_error(f"the stream from {handle.model} failed after it started: "
                                 f"{call.unnamed(handle.model, e.message)}",
                                 code=e.code or "stream_failed"))
        yield b"".join(pending)
    except asyncio.CancelledError:
        status = "cancelled"
        raise
    finally:
        await finish(status, usage)


# ------------------------------------------------------------------------------------ cascades


async def _cascade(request: Request, body: dict, plan: RoutePlan, snap: Snapshot, t0: float,
                   ticket: Any) -> Response:
    """`strategy: cascade` (see `pipeline.cascade`): drafts first, the plan's candidates only when
    no draft is accepted. Every call is metered and paid; `usage` is the answering model's."""
    metrics = request.app.state.services.metrics
    stream = bool(body.get("stream"))
    trust = cascade.trusted(plan)
    if trust is not None:  # the router trusts the draft: an ordinary call to it, the candidates behind it
        lead = cascade.draft_plan(plan, trust, snap).candidates
        single = plan.model_copy(update={"candidates": lead + plan.candidates, "strategy": "single"})
        extra = {"x-concilium-strategy": "cascade",
                 "x-concilium-cascade": header_value(cascade.summary(plan.cascade, None))}
        metrics.child(metrics.cascade, plan.route, trust.model, "trusted").inc()
        if stream:
            return await _stream(request, body, single, snap, t0, ticket, extra)
        return await _complete(request, body, single, snap, t0, ticket, extra)

    def final(p: RoutePlan):
        return call.stream(p, body, snap.ctx) if stream else call.complete(p, body, snap.ctx)

    task = asyncio.ensure_future(cascade.run(plan, body, snap, final))
    watcher = asyncio.ensure_future(until_disconnect(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():  # the client went away: stop every call in flight
        task.cancel()
        try:
            await task
        except BaseException:
            pass
        metrics.requests.labels(plan.cascade[0].model, plan.route, "cancelled").inc()
        if ticket is not None:
            ticket.done(None, None, "cancelled")
        return Response(status_code=499)
    run: cascade.Run = task.result()
    for step in run.steps:
        if step.action == "skip":
            metrics.child(metrics.cascade, plan.route, step.model, "skipped").inc()
        elif step.error is not None:
            metrics.child(metrics.cascade, plan.route, step.model, "failed").inc()
        elif step.score is not None:
            metrics.child(metrics.cascade_score, plan.route, step.model).observe(step.score)
            metrics.child(metrics.cascade, plan.route, step.model, "accepted" if step.accepted else "escalated").inc()
    draft_calls = [c for c in run.calls if c.model != run.draft_model or not c.ok]
    for c in draft_calls:
        metrics.record(c.model, plan.route, "draft" if c.ok else "draft-error", c.seconds, c.usage,
                       call_cost(request, snap, c.model, c.usage, c.seconds))
    if run.error is not None:
        metrics.requests.labels(plan.candidates[0].model if plan.candidates else "none", plan.route, "error").inc()
        if ticket is not None:
            ticket.done(None, None, "failed", draft_calls)  # the drafts were called: they are paid
        raise provider_error(run.error, plan) from None
    answered = run.draft_model if run.draft is not None else (
        run.final.model if stream else run.final[0])  # type: ignore[union-attr,index]
    headers = {"x-concilium-strategy": "cascade",
               "x-concilium-cascade": header_value(cascade.summary(run.steps, answered))}
    if run.draft is not None:  # a draft is the answer
        result, model = run.draft, run.draft_model
        usage = result.get("usage") if isinstance(result.get("usage"), dict) else None
        elapsed = time.perf_counter() - t0
        metrics.record(model, plan.route, "ok", elapsed, usage, call_cost(request, snap, model, usage, elapsed))
        if ticket is not None:
            ticket.done(model, usage, "ok", draft_calls)
        if stream:
            want_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            events = cascade.completion_events(result, want_usage)
            return Response(b"".join(events), media_type="text/event-stream",
                            headers={**plan_headers(plan, model), **headers, "cache-control": "no-cache"})
        return Response(orjson.dumps(_explained(request, result, run)), media_type="application/json",
                        headers={**plan_headers(plan, model), **headers})
    if stream:
        return _serve_stream(request, body, plan, snap, t0, ticket, run.final, headers, draft_calls)
    model, result, attempts = run.final  # type: ignore[misc]
    usage = result.get("usage") if isinstance(result.get("usage"), dict) else None
    response = Response(orjson.dumps(_explained(request, result, run)), media_type="application/json",
                        headers={**plan_headers(plan, model), **headers})
    elapsed = time.perf_counter() - t0
    metrics.record(model, plan.route, "ok", elapsed, usage, call_cost(request, snap, model, usage, elapsed))
    if ticket is not None:
        ticket.done(model, usage, "ok", draft_calls)
    if attempts:
        metrics.fallbacks.labels(plan.route).inc()
    return response


def _explained(request: Request, result: dict, run: Any) -> dict:
    """With `x-concilium-explain: true`, the response carries the whole cascade (`concilium.cascade`)."""
    if (request_header(request, b"x-concilium-explain") or "").lower() not in ("1", "true", "yes"):
        return result
    return {**result, "concilium": {"strategy": "cascade", "cascade": [s.model_dump(exclude_none=True)
                                                                        for s in run.steps]}}
