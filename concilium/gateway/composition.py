"""`strategy: fusion` and `strategy: chain` on the chat route: the steps (`pipeline.compose`), then
the synthesiser (the plan's candidates) answers, streamed or whole.

Every call is metered and paid once: the steps are the ticket's `prior` calls, the synthesiser its
answer. A streaming client gets the plan at once as an SSE comment (`: concilium.plan {...}`), one
comment per step as it starts and ends (`: concilium.step {...}`; SSE clients such as the openai SDK
skip comments), then the synthesis as an ordinary chat stream. A client that leaves cancels every
call in flight and pays for what was called.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from concilium.core import tracing
from concilium.core.plan import RoutePlan
from concilium.gateway import chat
from concilium.gateway.errors import sse_error
from concilium.gateway.headers import header_value, plan_headers
from concilium.gateway.requests import request_header
from concilium.gateway.responses import EventStreamResponse
from concilium.pipeline import compose
from concilium.pipeline.state import Snapshot
from concilium.specialists import call
from concilium.specialists.base import ProviderError


def _headers(plan: RoutePlan, model: str | None, comp: compose.Composed) -> dict[str, str]:
    return {**plan_headers(plan, model), "x-concilium-strategy": plan.strategy if comp.note is None else "single",
            "x-concilium-steps": header_value(compose.summary(plan, comp.note))}


def _explain(request: Request) -> bool:
    return (request_header(request, b"x-concilium-explain") or "").lower() in ("1", "true", "yes")


def _record(request: Request, snap: Snapshot, comp: compose.Composed) -> None:
    """Metrics for the calls before the synthesis (each also in the request's cost)."""
    metrics = request.app.state.services.metrics
    plan = comp.plan
    for s in plan.steps:
        if s.role != "synthesiser" and s.status != "planned":
            metrics.child(metrics.composition_steps, plan.route, s.role, s.status).inc()
    for c in comp.calls:
        metrics.record(c.model, plan.route, "step" if c.ok else "step-error", c.seconds, c.usage,
                       chat.call_cost(request, snap, c.model, c.usage, c.seconds))


async def serve(request: Request, body: dict[str, Any], plan: RoutePlan, snap: Snapshot, t0: float,
                ticket: Any) -> Response:
    if body.get("stream"):
        return _stream(request, body, plan, snap, t0, ticket)
    metrics = request.app.state.services.metrics
    comp = compose.Composed(plan)
    synth_s: list[float] = []

    async def whole() -> tuple[str, dict, list] | None:
        await compose.prepare(comp, body, snap)
        if comp.error is not None or comp.synth_body is None:
            return None
        s0 = time.perf_counter()
        try:
            return await call.complete(plan, comp.synth_body, snap.ctx)
        finally:
            synth_s.append(time.perf_counter() - s0)

    task = asyncio.ensure_future(whole())
    watcher = asyncio.ensure_future(chat.until_disconnect(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():  # the client went away: stop every call in flight; pay for what was called
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        _record(request, snap, comp)
        metrics.requests.labels(plan.candidates[0].model, plan.route, "cancelled").inc()
        if ticket is not None:
            ticket.done(None, None, "failed", comp.calls)
        return Response(status_code=499)
    _record(request, snap, comp)
    if synth_s:
        metrics.child(metrics.composition_synthesis, plan.route).observe(synth_s[0])
    try:
        out = task.result()
    except (ProviderError, call.AllCandidatesFailed) as e:  # the synthesiser failed
        if ticket is not None:
            ticket.done(None, None, "failed", comp.calls)
        metrics.requests.labels(plan.candidates[0].model, plan.route, "error").inc()
        raise chat.provider_error(e, plan) from None
    if out is None:  # the panel or the steps failed
        if ticket is not None:
            ticket.done(None, None, "failed", comp.calls)
        metrics.requests.labels(plan.candidates[0].model, plan.route, "error").inc()
        err = comp.error or ProviderError("the composition produced nothing to synthesise", status=502)
        raise chat.provider_error(err, plan) from None
    model, result, attempts = out
    usage = result.get("usage") if isinstance(result.get("usage"), dict) else None
    if _explain(request):
        result = {**result, "concilium": {"strategy": plan.strategy, "note": comp.note,
                                          "steps": [s.model_dump(exclude_none=True, exclude={"task"})
                                                    for s in plan.steps]}}
    response = Response(orjson.dumps(result), media_type="application/json", headers=_headers(plan, model, comp))
    elapsed = time.perf_counter() - t0
    metrics.record(model, plan.route, "ok", elapsed, usage, chat.call_cost(request, snap, model, usage, elapsed))
    if ticket is not None:
        ticket.done(model, usage, "ok", comp.calls)
    if attempts:
        metrics.fallbacks.labels(plan.route).inc()
    return response


def _comment(kind: str, data: dict[str, Any]) -> bytes:
    return b": concilium." + kind.encode() + b" " + orjson.dumps(data) + b"\n\n"


def _stream(request: Request, body: dict[str, Any], plan: RoutePlan, snap: Snapshot, t0: float,
            ticket: Any) -> Response:
    metrics = request.app.state.services.metrics
    comp = compose.Composed(plan)
    want_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    progress: asyncio.Queue[bytes] = asyncio.Queue()
    settled = False

    async def emit(event: dict[str, Any]) -> None:
        progress.put_nowait(_comment("step", event))

    def settle(model: str | None, usage: dict | None, status: str) -> None:
        nonlocal settled
        if settled:
            return
        settled = True
        if ticket is not None:
            ticket.done(model, usage, "failed" if model is None else status, comp.calls)

    async def events() -> AsyncIterator[bytes]:
        yield _comment("plan", {"strategy": plan.strategy, "steps": [
            {"id": s.id, "role": s.role, "model": s.model, "after": s.after} for s in plan.steps]})
        prep = asyncio.ensure_future(compose.prepare(comp, body, snap, emit=emit))
        try:
            while not prep.done() or not progress.empty():
                if progress.empty():
                    getter = asyncio.ensure_future(progress.get())
                    await asyncio.wait({getter, prep}, return_when=asyncio.FIRST_COMPLETED)
                    if not getter.done():
                        getter.cancel()
                        continue
                    yield getter.result()
                else:
                    yield progress.get_nowait()
            prep.result()
        except BaseException:
            if not prep.done():
                prep.cancel()
                await asyncio.gather(prep, return_exceptions=True)
            _record(request, snap, comp)
            settle(None, None, "failed")
            metrics.requests.labels(plan.candidates[0].model, plan.route, "cancelled").inc()
            raise
        _record(request, snap, comp)
        if comp.error is not None or comp.synth_body is None:
            settle(None, None, "failed")
            metrics.requests.labels(plan.candidates[0].model, plan.route, "error").inc()
            err = comp.error or ProviderError("the composition produced nothing to synthesise")
            yield sse_error(str(err), code=err.code or "composition_failed") + b"data: [DONE]\n\n"
            return
        if comp.note:
            yield _comment("note", {"note": comp.note})
        s0 = time.perf_counter()
        try:
            handle = await call.stream(plan, comp.synth_body, snap.ctx)
        except (ProviderError, call.AllCandidatesFailed) as e:
            settle(None, None, "failed")
            metrics.requests.labels(plan.candidates[0].model, plan.route, "error").inc()
            yield sse_error(f"the synthesiser failed: {e}", code="all_candidates_failed") + b"data: [DONE]\n\n"
            return
        metrics.child(metrics.ttft, handle.model, plan.route).observe(time.perf_counter() - t0)

        async def finish(status: str, usage: dict | None) -> None:
            await call._aclose(handle.rest)
            metrics.child(metrics.composition_synthesis, plan.route).observe(time.perf_counter() - s0)
            elapsed = time.perf_counter() - t0
            metrics.record(handle.model, plan.route, status, elapsed, usage,
                           chat.call_cost(request, snap, handle.model, usage, elapsed))
            if tracing.ENABLED:
                chat.trace_usage(request, handle.model, usage)
            settle(handle.model, usage, status)

        async for chunk in chat.relay(handle, want_usage, finish):
            yield chunk

    async def on_close() -> None:  # a client gone before the first byte: nothing ran, nothing to pay
        settle(None, None, "failed")

    return EventStreamResponse(events(), media_type="text/event-stream",
                               headers={**_headers(plan, None, comp), "cache-control": "no-cache"},
                               on_close=on_close)
