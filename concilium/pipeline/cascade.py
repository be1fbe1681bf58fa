"""`strategy: cascade`: cheap drafts answer first, a scorer reads each draft, and the plan's
candidates (the strong models) are paid only when no draft is accepted.

    run = await cascade.run(plan, body, snap, final=lambda p: call.complete(p, body, snap.ctx))

`run.draft` is the accepted draft's chat.completion (or None), `run.final` what `final` returned
when the cascade escalated; `run.steps` say what each draft scored and cost, and `run.calls` list
every model call made (for billing and metrics: each is paid exactly once). The drafts are called
without streaming, because a draft is judged whole; a streaming client is then sent the accepted
draft (`completion_events`) or the strong model's live stream. A draft the prompt router trusts
(`trust_above`) is not scored: the caller serves it as an ordinary call.

With `hedge_after_ms`, a draft that has not answered by then races the final stage: whichever
settles the request first wins and the other call is cancelled (and billed for what it used).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import orjson

from concilium.core import tracing
from concilium.core.plan import CascadeStep, RoutePlan
from concilium.policy.loader import PolicyError, format_loc
from concilium.policy.pricing import cost_usd, estimated_usage
from concilium.policy.schema import Policy
from concilium.router.cascade import Scorer, ScorerSpecError, build_scorer, completion_text
from concilium.router.text import prompt_chars
from concilium.specialists import call
from concilium.specialists.base import ProviderError, chunk, sse_event

T = TypeVar("T")
_DONE = b"data: [DONE]\n\n"


@dataclass
class Call:
    """One model call a request made: what it used (None: not reported) and how long it took."""

    model: str
    usage: dict | None
    seconds: float
    ok: bool = True


@dataclass
class Run(Generic[T]):
    steps: list[CascadeStep]
    calls: list[Call] = field(default_factory=list)
    draft: dict | None = None  # the accepted draft's chat.completion
    draft_model: str | None = None
    final: T | None = None  # what `final` returned, when the cascade escalated
    error: ProviderError | call.AllCandidatesFailed | None = None  # the final stage failed
    scoring_s: float = 0.0  # time spent scoring drafts

    @property
    def escalated(self) -> bool:
        return self.draft is None


# ------------------------------------------------------------------------------------ scorers

_scorers: dict[bytes, Scorer] = {}
_lock = threading.Lock()


def scorer_for(spec: Any) -> Scorer:
    """The scorer a policy spec describes (built once per distinct spec)."""
    key = orjson.dumps(spec, option=orjson.OPT_SORT_KEYS)
    with _lock:
        s = _scorers.get(key)
        if s is None:
            s = _scorers[key] = build_scorer(spec)
        return s


def check_strategies(policy: Policy, file: str) -> None:
    """Raise PolicyError (file, key path, what is wrong) for cascade routes that cannot run."""
    problems = strategy_problems(policy)
    if problems:
        raise PolicyError(file, [(format_loc(loc), msg) for loc, msg in problems])


def strategy_problems(policy: Policy) -> list[tuple[tuple, str]]:
    """What the policy's cascade routes get wrong beyond the schema: scorers that cannot be built
    (unknown options, a verifier artifact that is not there), as (key path, message)."""
    problems = []
    for i, route in enumerate(policy.routes):
        if route.cascade is None:
            continue
        try:
            scorer_for(route.cascade.scorer)
        except ScorerSpecError as e:
            inner = [p for p in e.path.replace("[", ".").replace("]", "").split(".") if p]
            where = ("routes", i, "cascade", "scorer", *[int(p) if p.isdigit() else p for p in inner])
            problems.append((where, e.msg))
        for j, name in enumerate(route.cascade.drafts):
            if name in route.targets or name in route.fallbacks:
                problems.append((("routes", i, "cascade", "drafts", j),
                                 f"{name!r} is also one of the route's targets or fallbacks; a draft is "
                                 "tried first, the targets are what it escalates to"))
    return problems


# ------------------------------------------------------------------------------------ running

def draft_plan(plan: RoutePlan, step: CascadeStep, snap: Any) -> RoutePlan:
    """A one-model plan for a draft: no fallbacks (the next stage is the fallback), no retries."""
    from concilium.core.plan import Candidate

    spec = snap.policy.models[step.model]
    return plan.model_copy(update={
        "candidates": [Candidate(model=step.model, provider=spec.provider, predicted_quality=step.router_quality,
                                 timeout_s=spec.timeout_s, reason="cascade draft")],
        "retries": 0, "strategy": "single", "cascade": []})


def draft_body(body: dict[str, Any], snap: Any, plan: RoutePlan) -> dict[str, Any]:
    out = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    route = next((r for r in snap.policy.routes if r.name == plan.route), None)
    c = route.cascade if route is not None else None
    # A logprobs scorer needs them: upstreams are asked (the local runtime computes them only when asked).
    if c is not None and (c.logprobs or b'"logprobs"' in orjson.dumps(c.scorer)) and "logprobs" not in out:
        out["logprobs"] = True
    return out


def estimated_prompt_usage(body: dict[str, Any]) -> dict[str, Any]:
    """What a call that was cancelled before it answered used: its prompt, estimated."""
    return estimated_usage(prompt_chars(body), len(body.get("messages") or []))


async def _cancel(task: asyncio.Task) -> None:
    task.cancel()
    try:
        await task
    except BaseException:
        pass


async def run(plan: RoutePlan, body: dict[str, Any], snap: Any,
              final: Callable[[RoutePlan], Awaitable[T]]) -> Run[T]:
    """Try the plan's scored drafts in order; escalate to `final(plan)` when none is accepted.

    A final stage that fails is `run.error` (the drafts' calls were still made and are paid). A draft
    that fails is recorded and the next stage tried. With no candidates to escalate to, the last
    draft that answered is served."""
    out: Run[T] = Run(steps=[s.model_copy() for s in plan.cascade])
    scorer = scorer_for(plan.scorer["spec"]) if plan.scorer else None
    hedge_ms = _hedge_ms(snap, plan)
    dbody = draft_body(body, snap, plan)
    last: tuple[str, dict, CascadeStep] | None = None
    final_task: asyncio.Task | None = None
    earlier: list[str] = []  # the answers of the drafts before this one (what `agreement` compares)
    for step in out.steps:
        if step.action != "score":
            continue
        with tracing.step(step, "draft"):  # the draft's call and its scoring
            t0 = time.perf_counter()
            task = asyncio.ensure_future(call.complete(draft_plan(plan, step, snap), dbody, snap.ctx))
            try:
                if hedge_ms is not None and final_task is None and plan.candidates:
                    done, _ = await asyncio.wait({task}, timeout=hedge_ms / 1000)
                    if not done:  # slow draft: start the final stage beside it
                        final_task = asyncio.ensure_future(final(plan))
                        await asyncio.wait({task, final_task}, return_when=asyncio.FIRST_COMPLETED)
                        if final_task.done() and not task.done():
                            await _cancel(task)
                            step.error = f"cancelled: the final stage answered first (hedge after {hedge_ms:g} ms)"
                            out.calls.append(Call(step.model, estimated_prompt_usage(dbody), time.perf_counter() - t0,
                                                  ok=False))
                            step.latency_s = time.perf_counter() - t0
                            await _final(out, final_task)
                            return out
                model, result, _ = await task
            except (ProviderError, call.AllCandidatesFailed) as e:
                step.error = str(e)[:300]
                step.latency_s = time.perf_counter() - t0
                out.calls.append(Call(step.model, None, step.latency_s, ok=False))
                continue
            except BaseException:
                if not task.done():
                    await _cancel(task)
                if final_task is not None:
                    await _cancel(final_task)
                raise
            step.latency_s = time.perf_counter() - t0
            usage = result.get("usage") if isinstance(result.get("usage"), dict) else None
            step.usage = usage
            spec = snap.policy.models.get(model)
            step.cost_usd = cost_usd(spec, usage, step.latency_s) if spec is not None else None
            out.calls.append(Call(model, usage, step.latency_s))
            s0 = time.perf_counter()
            step.score = round(scorer.score_completion(body, result, samples=earlier, router_quality=step.router_quality)
                               if scorer is not None else 1.0, 4)
            earlier.append(completion_text(result))
            out.scoring_s += time.perf_counter() - s0
            step.accepted = step.score >= (step.threshold if step.threshold is not None else 0.5)
            if step.accepted:
                if final_task is not None:  # the draft won the race
                    await _stop_final(final_task, out, plan, dbody, t0)
                out.draft, out.draft_model = result, model
                return out
            last = (model, result, step)
    if final_task is not None:
        await _final(out, final_task)
        return out
    if not plan.candidates and last is not None:  # nothing stronger to ask: the best we have
        model, result, step = last
        step.accepted = True
        step.reason += "; served although rejected: no model to escalate to is callable"
        out.draft, out.draft_model = result, model
        return out
    await _final(out, final(plan))
    return out


async def _final(out: Run, pending: Awaitable) -> None:
    try:
        out.final = await pending
    except (ProviderError, call.AllCandidatesFailed) as e:
        out.error = e


async def _stop_final(task: asyncio.Task, out: Run, plan: RoutePlan, body: dict[str, Any], t0: float) -> None:
    """The draft settled the request while the hedged final stage was still going: stop it, and
    record what it used (it is billed like any call)."""
    if not task.done():
        await _cancel(task)
        out.calls.append(Call(plan.candidates[0].model, estimated_prompt_usage(body), time.perf_counter() - t0,
                              ok=False))
        return
    if task.cancelled() or task.exception() is not None:
        return
    result = task.result()
    if isinstance(result, call.StreamHandle):  # it had started streaming: stop it
        await call._aclose(result.rest)
        out.calls.append(Call(result.model, estimated_prompt_usage(body), time.perf_counter() - t0, ok=False))
    elif isinstance(result, tuple) and len(result) == 3:  # a finished completion: it was paid for
        usage = result[1].get("usage") if isinstance(result[1], dict) else None
        out.calls.append(Call(result[0], usage, time.perf_counter() - t0))


def _hedge_ms(snap: Any, plan: RoutePlan) -> float | None:
    route = next((r for r in snap.policy.routes if r.name == plan.route), None)
    return route.cascade.hedge_after_ms if route is not None and route.cascade is not None else None


def trusted(plan: RoutePlan) -> CascadeStep | None:
    """The draft the prompt router trusts enough to serve unscored, if the plan has one."""
    return next((s for s in plan.cascade if s.action == "trust"), None)


# ------------------------------------------------------------------------------------ serving

def completion_events(result: dict[str, Any], want_usage: bool) -> list[bytes]:
    """A whole chat.completion as the SSE chunks a streaming client expects (role, content or tool
    calls, finish reason, usage when asked, [DONE])."""
    cid, model, created = result.get("id") or "chatcmpl-cascade", result.get("model") or "", int(
        result.get("created") or time.time())
    choice = (result.get("choices") or [{}])[0]
    msg = choice.get("message") or {}
    events = [sse_event(chunk(cid, model, created, {"role": "assistant", "content": ""}))]
    if msg.get("content"):
        events.append(sse_event(chunk(cid, model, created, {"content": msg["content"]})))
    if msg.get("tool_calls"):
        calls = [{"index": i, **tc} for i, tc in enumerate(msg["tool_calls"])]
        events.append(sse_event(chunk(cid, model, created, {"tool_calls": calls})))
    events.append(sse_event(chunk(cid, model, created, {}, choice.get("finish_reason") or "stop")))
    if want_usage and isinstance(result.get("usage"), dict):
        events.append(sse_event(chunk(cid, model, created, None, usage=result["usage"])))
    events.append(_DONE)
    return events


def summary(steps: list[CascadeStep], answered_by: str | None) -> str:
    """One line for the x-concilium-cascade header."""
    parts = []
    for s in steps:
        if s.action == "skip":
            parts.append(f"{s.model} skipped")
        elif s.action == "trust":
            parts.append(f"{s.model} trusted (router {s.router_quality:.2f})" if s.router_quality is not None
                         else f"{s.model} trusted")
        elif s.error:
            parts.append(f"{s.model} failed")
        elif s.score is not None:
            verdict = "accepted" if s.accepted else "escalated"
            parts.append(f"{s.model} score {s.score:.2f} {'>=' if s.accepted else '<'} {s.threshold:g} {verdict}")
    if answered_by:
        parts.append(f"answered by {answered_by}")
    return "; ".join(parts)
