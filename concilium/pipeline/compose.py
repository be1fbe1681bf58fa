"""`strategy: fusion` and `strategy: chain`: the calls before the synthesis.

    comp = Composed(plan)
    await compose.prepare(comp, body, snap, emit=progress)
    # then the plan's candidates (the synthesiser) answer `comp.synth_body`, streamed or not

`prepare` runs the plan's steps (the router planned them, see `router/compose.py`): a fusion panel
layer by layer, each layer's calls concurrently; a chain's planner (when a model plans), then its
steps in waves (a step starts once the steps it reads have finished). It fills in `comp`:

- `comp.plan.steps`: each step's status, tokens, cost and time (what `x-concilium-explain` shows);
- `comp.calls`: every model call made, for billing and metrics (each is paid exactly once, also
  when the request is cancelled half-way: `comp` is filled in as calls finish);
- `comp.synth_body`: the request the synthesiser answers: the client's, with the answers in a
  system message, and the client's tools (only the synthesiser sees tools, so a tool call is the
  synthesiser's decision, made once);
- `comp.note`: why the composition answered as `single` instead (an invalid or oversized plan);
- `comp.error`: the panel failed (below quorum, or a failure with `on_error: fail`).

`restored` (step id -> a checkpoint) lets a job that a dead worker left half done skip the steps it
already paid for; `checkpoint(step, text)` is awaited after each step, before the next may start.
`emit(event)` is awaited as steps start and end (progress for streaming clients).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from concilium.core import tracing
from concilium.core.plan import Candidate, RoutePlan, Step
from concilium.pipeline.cascade import Call, estimated_prompt_usage
from concilium.policy.compose import (
    CHAIN_SYNTHESIS_PROMPT,
    REFINE_PROMPT,
    STEP_PROMPT,
    SYNTHESIS_PROMPT,
    Chain,
    Fusion,
)
from concilium.policy.pricing import cost_usd
from concilium.router import compose as planning
from concilium.router.cascade import completion_text
from concilium.specialists import call
from concilium.specialists.base import ProviderError

Emit = Callable[[dict[str, Any]], Awaitable[None]]
Checkpoint = Callable[[Step, str], Awaitable[None]]
# What only the synthesiser may see: the client's tools, and the stream settings of the final answer.
_SYNTH_ONLY = ("tools", "tool_choice", "parallel_tool_calls", "functions", "function_call", "stream",
               "stream_options", "n")
PLANNER_MAX_TOKENS = 512


@dataclass
class Composed:
    plan: RoutePlan
    calls: list[Call] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)  # step id -> its answer
    synth_body: dict[str, Any] | None = None
    note: str | None = None  # answered as `single` instead, and why
    error: ProviderError | None = None
    seconds: float = 0.0  # the time before the synthesis

    def section(self, snap: Any) -> Fusion | Chain | None:
        route = next((r for r in snap.policy.routes if r.name == self.plan.route), None)
        return None if route is None else route.fusion if self.plan.strategy == "fusion" else route.chain


def model_plan(plan: RoutePlan, model: str, snap: Any, timeout_s: float | None, reason: str) -> RoutePlan:
    """A one-model plan for one step: that model only (a step has no fallbacks), the plan's retries."""
    spec = snap.policy.models[model]
    limit = min((x for x in (timeout_s, spec.timeout_s, plan.timeout_s) if x is not None), default=None)
    return plan.model_copy(update={
        "candidates": [Candidate(model=model, provider=spec.provider, timeout_s=limit, reason=reason)],
        "strategy": "single", "steps": [], "cascade": []})


def with_instructions(body: dict[str, Any], text: str) -> dict[str, Any]:
    """`body` with `text` added to its system message (a new first message when it has none)."""
    messages = list(body.get("messages") or [])
    if messages and isinstance(messages[0], dict) and messages[0].get("role") in ("system", "developer") \
            and isinstance(messages[0].get("content"), str):
        messages[0] = {**messages[0], "content": messages[0]["content"] + "\n\n" + text}
    else:
        messages.insert(0, {"role": "system", "content": text})
    return {**body, "messages": messages}


def _numbered(items: list[tuple[str, str]]) -> str:
    return "\n\n".join(f"[{label}]\n{text.strip()}" for label, text in items)


async def prepare(comp: Composed, body: dict[str, Any], snap: Any, *, emit: Emit | None = None,
                  restored: dict[str, dict] | None = None, checkpoint: Checkpoint | None = None) -> None:
    """Run everything before the synthesis (see the module's docstring); fills `comp` in."""
    section = comp.section(snap)
    if section is None:  # the route is gone from a reloaded policy: the synthesiser answers alone
        comp.note = "the route's composition is no longer in the policy: answered as single"
        comp.synth_body = body
        return
    t0 = time.perf_counter()
    run = _Runner(comp, body, snap, section, emit, restored or {}, checkpoint)
    try:
        if isinstance(section, Fusion):
            await run.fusion()
        else:
            await run.chain()
    finally:
        comp.seconds = time.perf_counter() - t0


class _Runner:
    def __init__(self, comp: Composed, body: dict[str, Any], snap: Any, section: Fusion | Chain,
                 emit: Emit | None, restored: dict[str, dict], checkpoint: Checkpoint | None) -> None:
        self.comp, self.body, self.snap, self.section = comp, body, snap, section
        self.emit, self.restored, self.checkpoint = emit, restored, checkpoint
        self.base = {k: v for k, v in body.items() if k not in _SYNTH_ONLY}
        self.deadline = time.monotonic() + section.timeout_s if section.timeout_s else None

    # -- one call -----------------------------------------------------------------------------
    async def _event(self, step: Step, **extra: Any) -> None:
        if self.emit is not None:
            await self.emit({"id": step.id, "role": step.role, "model": step.model, "status": step.status, **extra})

    async def step(self, step: Step, sbody: dict[str, Any]) -> str | None:
        """Call one step's model; its answer, or None when it failed (recorded on the step)."""
        with tracing.step(step):
            return await self._step(step, sbody)

    async def _step(self, step: Step, sbody: dict[str, Any]) -> str | None:
        if (saved := self.restored.get(step.id)) is not None:  # a finished step of an earlier run
            step.status, step.usage, step.latency_s = "restored", saved.get("usage"), saved.get("latency_s")
            step.cost_usd = saved.get("cost_usd")
            self.comp.calls.append(Call(step.model, step.usage, step.latency_s or 0.0))  # paid once: now
            self.comp.outputs[step.id] = saved["text"]
            await self._event(step)
            return saved["text"]
        await self._event(step, status="started")
        t0 = time.perf_counter()
        timeout = self.section.call_timeout_s
        if self.deadline is not None:
            timeout = min(timeout or 1e9, max(0.001, self.deadline - time.monotonic()))
        try:
            _, result, _ = await call.complete(model_plan(self.comp.plan, step.model, self.snap, timeout, step.role),
                                               sbody, self.snap.ctx)
        except (ProviderError, call.AllCandidatesFailed) as e:
            step.status, step.error, step.latency_s = "failed", str(e)[:300], time.perf_counter() - t0
            self.comp.calls.append(Call(step.model, None, step.latency_s, ok=False))
            await self._event(step, error=step.error)
            return None
        except asyncio.CancelledError:  # the client left, or the total timeout: paid for its prompt
            step.status, step.latency_s = "cancelled", time.perf_counter() - t0
            self.comp.calls.append(Call(step.model, estimated_prompt_usage(sbody), step.latency_s, ok=False))
            raise
        step.latency_s = time.perf_counter() - t0
        step.usage = result.get("usage") if isinstance(result.get("usage"), dict) else None
        spec = self.snap.policy.models.get(step.model)
        step.cost_usd = cost_usd(spec, step.usage, step.latency_s) if spec is not None else None
        self.comp.calls.append(Call(step.model, step.usage, step.latency_s))
        text = completion_text(result)
        if not text.strip():
            step.status, step.error = "failed", "answered with no text"
            await self._event(step, error=step.error)
            return None
        step.status = "ok"
        self.comp.outputs[step.id] = text
        if self.checkpoint is not None:
            await self.checkpoint(step, text)
        await self._event(step, latency_s=round(step.latency_s, 4), cost_usd=step.cost_usd)
        return text

    async def wave(self, steps: list[Step], bodies: list[dict[str, Any]]) -> list[str | None]:
        """Steps that do not wait for each other, concurrently, within the total timeout."""
        tasks = [asyncio.ensure_future(self.step(s, b)) for s, b in zip(steps, bodies, strict=True)]
        left = None if self.deadline is None else max(0.0, self.deadline - time.monotonic())
        try:
            done, pending = await asyncio.wait(tasks, timeout=left)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        out: list[str | None] = []
        for s, t in zip(steps, tasks, strict=True):
            if t in pending:
                s.error = f"cancelled at the composition's timeout_s ({self.section.timeout_s:g}s)"
                await self._event(s, error=s.error)
                out.append(None)
            else:
                out.append(t.result())
        return out

    def _failed(self, steps: list[Step], answers: list[str | None], need: int, what: str) -> ProviderError | None:
        ok = sum(a is not None for a in answers)
        bad = [f"{s.id} ({s.model}): {s.error}" for s, a in zip(steps, answers, strict=True) if a is None]
        if bad and self.section.on_error == "fail":
            return ProviderError(f"{what}: a call failed and on_error is fail: " + "; ".join(bad)[:600],
                                 status=502, code="composition_failed", retryable=False)
        if ok < need:
            return ProviderError(f"{what}: {ok} of {len(steps)} calls answered, fewer than quorum {need}: "
                                 + "; ".join(bad)[:600], status=502, code="composition_failed", retryable=False)
        return None

    # -- fusion -------------------------------------------------------------------------------
    async def fusion(self) -> None:
        fusion: Fusion = self.section  # type: ignore[assignment]
        panel = [s for s in self.comp.plan.steps if s.role == "panelist"]
        previous: list[tuple[str, str]] = []
        for layer in sorted({s.layer for s in panel}):
            steps = [s for s in panel if s.layer == layer]
            bodies = []
            for s in steps:
                b = dict(self.base)
                if s.seed is not None:
                    b["seed"] = int(self.body.get("seed") or 0) + s.seed
                if previous:  # Mixture-of-Agents: this layer reads the previous one
                    b = with_instructions(b, REFINE_PROMPT.format(answers=_numbered(previous)))
                bodies.append(b)
            answers = await self.wave(steps, bodies)
            if (err := self._failed(steps, answers, fusion.quorum, f"fusion layer {layer}")) is not None:
                self.comp.error = err
                return
            previous = [(f"answer {i + 1}", a) for i, a in enumerate(x for x in answers if x is not None)]
        prompt = (fusion.prompt or SYNTHESIS_PROMPT).format(answers=_numbered(previous))
        self.comp.synth_body = with_instructions(self.body, prompt)

    # -- chain --------------------------------------------------------------------------------
    async def chain(self) -> None:
        chain: Chain = self.section  # type: ignore[assignment]
        plan = self.comp.plan
        if plan.pending_steps:  # a model plans: ask it, check the plan, then add its steps
            planner = next(s for s in plan.steps if s.role == "planner")
            text = await self.step(planner, self._planner_body(chain))
            if text is None:
                return self._single(f"the planner failed ({planner.error})")
            try:
                parts = planning.parse_plan(text, chain)
            except planning.PlanError as e:
                return self._single(f"the planner's plan was refused: {e}")
            synth = next(s for s in plan.steps if s.role == "synthesiser")
            why_not = self.snap.availability
            steps = planning.chain_steps(parts, chain, self.snap.policy, synth.model, why_not,
                                         planning.categoriser(self.snap.dispatcher, self.snap.policy),
                                         self.snap.policy.router.default_output_tokens)
            synth.after = [s.id for s in steps]
            plan.steps = [planner, *steps, synth]
            plan.pending_steps = 0
        steps = [s for s in plan.steps if s.role == "specialist"]
        if not steps:
            return self._single("the plan has no steps")
        results: dict[str, str | None] = {}
        while len(results) < len(steps):
            ready = [s for s in steps if s.id not in results and all(a in results for a in s.after)]
            answers = await self.wave(ready, [self._step_body(s, results) for s in ready])
            results.update({s.id: a for s, a in zip(ready, answers, strict=True)})
            if chain.on_error == "fail" and (err := self._failed(ready, answers, 0, "chain")) is not None:
                self.comp.error = err
                return
        if (err := self._failed(steps, [results[s.id] for s in steps], 1, "chain")) is not None:
            self.comp.error = err  # every step failed: nothing to synthesise from
            return
        done = [(f"step {s.id}" + (f" ({s.category})" if s.category else "") + f": {s.task}\nresult:",
                 results[s.id] or "(this step failed; it has no result)") for s in steps]
        prompt = (chain.prompt or CHAIN_SYNTHESIS_PROMPT).format(answers=_numbered(done))
        self.comp.synth_body = with_instructions(self.body, prompt)

    def _single(self, why: str) -> None:
        """A plan that cannot run: the synthesiser answers the request alone, and the plan says so."""
        self.comp.note = why + ": answered as single"
        self.comp.plan.reasons.append("chain: " + self.comp.note)
        self.comp.synth_body = self.body

    def _planner_body(self, chain: Chain) -> dict[str, Any]:
        return {"model": chain.planner, "temperature": 0, "max_tokens": PLANNER_MAX_TOKENS,
                "messages": [{"role": "system", "content": planning.planner_prompt(chain)},
                             {"role": "user", "content": planning.last_user_text(self.body)}]}

    def _step_body(self, step: Step, results: dict[str, str | None]) -> dict[str, Any]:
        whole = planning.last_user_text(self.body)
        system = STEP_PROMPT.format(task=step.task)
        if whole.strip() != (step.task or "").strip():
            system += f"\n\nThe whole request, for context only:\n{whole}"
        user = step.task or whole
        earlier = [(f"result of step {a}", results.get(a) or "(failed: no result)") for a in step.after]
        if earlier:
            user += "\n\nResults of earlier steps you may use:\n\n" + _numbered(earlier)
        out = {k: v for k, v in self.base.items() if k != "messages"}
        out["messages"] = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        return out


def downgraded(plan: RoutePlan, why: str) -> RoutePlan:
    """A composition answered as `single` by its synthesiser, with the reason in the plan."""
    reasons = [r for r in plan.reasons if not r.startswith(f"{plan.strategy}: ")]
    reasons.insert(0, f"chose {plan.candidates[0].model}" if plan.candidates else "no model")
    reasons.append(f"{plan.strategy}: {why}: answered as single")
    return plan.model_copy(update={"strategy": "single", "steps": [], "pending_steps": 0, "pending_models": [],
                                   "reasons": reasons})


def summary(plan: RoutePlan, note: str | None = None) -> str:
    """One line for the x-concilium-steps header: each step's id, model and status."""
    parts = [f"{s.id} {s.model} {s.status}" + (f" {s.latency_s:.2f}s" if s.latency_s is not None else "")
             for s in plan.steps if s.role != "synthesiser"]
    if note:
        parts.append(note)
    return "; ".join(parts)
