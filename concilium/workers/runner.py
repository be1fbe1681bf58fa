"""Run one job: claim it, call the model through `specialists.call` (the gateway's own code path),
publish its events, and end it exactly once.

The run stops early when a cancel is requested (the store wakes it at once),
at the soft timeout (status `incomplete`, partial answer kept), at the hard deadline (status
`failed`), or when its lease was taken over by another worker (it then leaves the job alone).
A run that takes over a job from a dead worker keeps what was already published: text the clients
have seen is not sent twice, and the new run's text continues after it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from concilium.core import tracing
from concilium.core.plan import RoutePlan
from concilium.pipeline import cascade, compose
from concilium.pipeline.state import Snapshot
from concilium.policy.pricing import estimated_usage
from concilium.router.text import prompt_chars
from concilium.specialists import call
from concilium.specialists.base import ProviderError
from concilium.workers.config import JobsEnv
from concilium.workers.responses import OutputEvents, ev, response_object
from concilium.workers.store import JobStore

log = logging.getLogger("concilium.workers")
# What a call cost under the policy: (model, usage, wall seconds or None) -> USD (Snapshot.cost_usd).
CostOf = Callable[[str, dict | None, float | None], float | None]


@dataclass
class RunResult:
    state: str  # done | retry | fenced
    retry_in: float = 0.0


@dataclass
class _Progress:
    """What this run has published and learned so far."""

    text: str = ""  # the answer as the clients have seen it (all runs of the job)
    produced: str = ""  # what this run's model call produced
    model: str | None = None
    usage: dict[str, Any] | None = None
    finish_reason: str | None = None
    stop_reason: str | None = None  # cancel | soft | hard | lost
    error: dict[str, str] | None = None
    fenced: bool = False
    model_noted: bool = False
    prior: list[Any] = field(default_factory=list)  # a cascade's other calls (drafts): billed with the job
    seconds: float | None = None  # the answering call's wall time (what a GPU-second price charges)


def estimate_usage(spec: dict[str, Any], text: str) -> dict[str, Any]:
    """Token counts for a job that ended before its provider reported usage."""
    body = spec["body"]
    return estimated_usage(prompt_chars(body), len(body.get("messages") or []), text)


def _text_of(events: list[Any]) -> str:
    return "".join(e.json().get("delta", "") for e in events if e.type == "response.output_text.delta")


async def end_job(store: JobStore, job_id: str, record: dict[str, Any], status: str, *, text: str,
                  model: str | None, usage: dict[str, Any] | None, cost: CostOf | None, seconds: float | None = None,
                  error: dict[str, str] | None = None, incomplete: dict[str, str] | None = None,
                  token: str | None = None, only_if: str | None = None,
                  out: OutputEvents | None = None, prior: list[Any] | None = None) -> bool:
    """The one way a job ends: result, terminal events and bill in one atomic store step."""
    spec = record["spec"]
    result = {"text": text, "model": model, "usage": usage, "error": error, "incomplete_details": incomplete,
              "finished_at": int(time.time())}
    if model and usage is None and (text or status != "cancelled"):
        usage = result["usage"] = estimate_usage(spec, text)
    final = response_object(job_id, {"status": status, "spec": spec, "result": result})
    if out is None:
        seen = {e.type for e in await store.all_events(job_id)}
        out = OutputEvents.resume(job_id, seen)
    bill = None
    calls = [{"model": c.model, "usage": c.usage, "cost_usd": cost(c.model, c.usage, c.seconds) if cost else None}
             for c in prior or [] if c.usage]
    if (model and usage) or calls:
        own = cost(model, usage, seconds) if cost and model and usage else None
        total = None if own is None and not calls else (own or 0.0) + sum(c["cost_usd"] or 0.0 for c in calls)
        bill = {"owner": record.get("owner") or spec.get("owner"), "model": model, "route": spec["plan"]["route"],
                "status": status, "usage": usage, "cost_usd": total}
        if calls:
            bill["calls"] = calls  # every model call the job made besides the answer (a cascade's drafts)
    return await store.finish(job_id, token=token, status=status, result=result,
                              events=out.end(status, text, final), bill=bill, ttl_s=spec["ttl_s"],
                              only_if=only_if)


async def end_from_events(store: JobStore, job_id: str, status: str, *, error: dict[str, str] | None = None,
                          incomplete: dict[str, str] | None = None,
                          cost: CostOf | None = None,
                          only_if: str | None = None) -> bool:
    """End a job from outside its run (cancel before it started, a killed worker): the answer is
    what its events hold."""
    record = await store.get(job_id)
    if record is None:
        return False
    events = await store.all_events(job_id)
    out = OutputEvents.resume(job_id, {e.type for e in events})
    return await end_job(store, job_id, record, status, text=_text_of(events), model=record.get("model") or None,
                         usage=None, cost=cost, error=error, incomplete=incomplete, only_if=only_if, out=out)


class JobRunner:
    def __init__(self, store: JobStore, env: JobsEnv, snapshot: Callable[[], Awaitable[Snapshot]],
                 can_kill: bool) -> None:
        self.store = store
        self.env = env
        self.snapshot = snapshot
        self.can_kill = can_kill  # the pool kills at the hard limit; our own deadline is the fallback

    async def run(self, job_id: str, worker: str = "") -> RunResult:
        record = await self.store.get(job_id)
        if record is None:
            return RunResult("done")  # expired, or never stored
        if not tracing.ENABLED:
            return await self._run(job_id, worker, record)
        with tracing.job(job_id, record["spec"].get("traceparent"), worker) as sp:  # the gateway's trace
            result = await self._run(job_id, worker, record)
            sp.set_attribute("concilium.job.outcome", result.state)
            return result

    async def _run(self, job_id: str, worker: str, record: dict[str, Any]) -> RunResult:
        store, env = self.store, self.env
        spec = record["spec"]
        snap = await self.snapshot()  # before the lease starts: a policy change may load models
        token = uuid.uuid4().hex
        claim = await store.claim(job_id, token, worker, env.lease_s, spec["max_attempts"])
        if claim.state in ("missing", "terminal"):
            return RunResult("done")
        if claim.state == "busy":  # a live worker runs it (a re-delivered message): look again one
            return RunResult("retry", retry_in=claim.retry_in + env.lease_s)  # lease after this one lapses
        if claim.state == "exhausted":
            await end_from_events(store, job_id, "failed", cost=snap.cost_usd, error={
                "code": "worker_lost", "message": f"the job was started {claim.attempts - 1} times and its "
                                                  "worker was lost each time"})
            return RunResult("done")
        log.info("job %s: attempt %d on %s", job_id, claim.attempts, worker)
        prog = _Progress()
        out = OutputEvents(job_id)
        if claim.attempts > 1:  # taking over from a worker that died: keep what was published
            events = await store.all_events(job_id)
            out = OutputEvents.resume(job_id, {e.type for e in events})
            prog.text = _text_of(events)
        hard = spec["hard_timeout_s"] + (env.kill_grace_s if self.can_kill else 0.0)
        elapsed = time.time() - claim.started_at
        if elapsed >= hard:
            await self._end(job_id, record, "failed", prog, out, token, snap,
                            error=_hard_error(spec["hard_timeout_s"]))
            return RunResult("done")
        if record["cancel"]:  # cancelled while no worker was running it
            await self._end(job_id, record, "cancelled", prog, out, token, snap)
            return RunResult("done")
        started = response_object(job_id, {"status": "in_progress", "spec": spec})
        if (first := out.in_progress(started)) and await store.append(job_id, token, first) is None:
            return RunResult("fenced")

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        timers = [loop.call_later(max(0.0, hard - elapsed), _trigger, prog, stop, "hard")]
        if spec.get("soft_timeout_s"):
            timers.append(loop.call_later(max(0.0, spec["soft_timeout_s"] - elapsed), _trigger, prog, stop, "soft"))
        watcher = asyncio.ensure_future(self._watch(job_id, token, prog, stop))
        t_call = time.monotonic()
        try:
            await self._pump(job_id, token, spec, snap, out, prog, stop)
        finally:
            if prog.seconds is None:
                prog.seconds = time.monotonic() - t_call
            for t in timers:
                t.cancel()
            watcher.cancel()
        if prog.fenced or prog.stop_reason == "lost":
            return RunResult("fenced")
        status, error, incomplete = self._outcome(prog, spec)
        await self._end(job_id, record, status, prog, out, token, snap, error=error, incomplete=incomplete)
        log.info("job %s: %s (%d chars)", job_id, status, len(prog.text))
        return RunResult("done")

    @staticmethod
    def _outcome(prog: _Progress, spec: dict[str, Any]) -> tuple[str, dict | None, dict | None]:
        if prog.stop_reason == "cancel":
            return "cancelled", None, None
        if prog.stop_reason == "soft":
            return "incomplete", None, {"reason": "soft_timeout"}
        if prog.stop_reason == "hard":
            return "failed", _hard_error(spec["hard_timeout_s"]), None
        if prog.error is not None:
            return "failed", prog.error, None
        if prog.finish_reason == "length":
            return "incomplete", None, {"reason": "max_output_tokens"}
        return "completed", None, None

    async def _end(self, job_id: str, record: dict, status: str, prog: _Progress, out: OutputEvents, token: str,
                   snap: Snapshot, error: dict | None = None, incomplete: dict | None = None) -> None:
        await end_job(self.store, job_id, record, status, text=prog.text, model=prog.model or record.get("model"),
                      usage=prog.usage if prog.stop_reason is None else None,
                      cost=snap.cost_usd, seconds=prog.seconds, error=error, incomplete=incomplete, token=token,
                      out=out, prior=prog.prior)

    async def _watch(self, job_id: str, token: str, prog: _Progress, stop: asyncio.Event) -> None:
        """Wait for a cancel request, renewing the lease every third of it, until the run stops."""
        renew_every = self.env.lease_s / 3
        while not stop.is_set():
            try:
                if await self.store.wait_cancel(job_id, renew_every):
                    _trigger(prog, stop, "cancel")
                elif not await self.store.renew(job_id, token, self.env.lease_s):
                    _trigger(prog, stop, "lost")
            except Exception as e:  # the store retries on its own; keep watching
                log.warning("job %s: watcher: %s", job_id, e)
                await asyncio.sleep(0.1)

    async def _pump(self, job_id: str, token: str, spec: dict[str, Any], snap: Snapshot, out: OutputEvents,
                    prog: _Progress, stop: asyncio.Event) -> None:
        plan = RoutePlan.model_validate(spec["plan"])
        missing = [c.model for c in plan.candidates if c.model not in snap.policy.models]
        plan.candidates = [c for c in plan.candidates if c.model in snap.policy.models]
        plan.cascade = [s for s in plan.cascade if s.model in snap.policy.models]
        if not plan.candidates and not any(s.action != "skip" for s in plan.cascade):
            prog.error = {"code": "server_error", "message": "the worker's policy does not define "
                          f"{', '.join(missing)}: gateway and workers must load the same policy"}
            return
        stopped = asyncio.ensure_future(stop.wait())
        try:
            body = spec["body"]
            if plan.strategy in ("fusion", "chain"):  # the steps, checkpointed; then the synthesiser streams
                handle = await self._compose(job_id, token, plan, body, snap, prog, stop, stopped)
                if handle is None:
                    return
            elif plan.strategy == "cascade":  # the same cascade as in the gateway; its drafts are billed with the job
                run = await _unless_stopped(cascade.run(plan, body, snap, lambda p: call.stream(p, body, snap.ctx)),
                                            stopped)
                if run is None:
                    return
                done: cascade.Run = run.result()
                prog.prior = [c for c in done.calls if c.model != done.draft_model or not c.ok]
                if done.error is not None:
                    prog.error = _provider_error(done.error)
                    return
                if done.draft is not None:
                    prog.model = done.draft_model
                    prog.seconds = next((c.seconds for c in done.calls if c.model == done.draft_model and c.ok), None)
                    for raw in cascade.completion_events(done.draft, want_usage=True)[:-1]:
                        if not await self._feed(job_id, token, raw.rstrip(b"\n"), out, prog):
                            return
                    return
                handle = done.final
            else:
                opening = await _unless_stopped(call.stream(plan, body, snap.ctx), stopped)
                if opening is None:
                    return
                try:
                    handle = opening.result()
                except (ProviderError, call.AllCandidatesFailed) as e:
                    prog.error = _provider_error(e)
                    return
            prog.model = handle.model
            it = handle.rest
            try:
                for raw in handle.first:
                    if not await self._feed(job_id, token, raw, out, prog):
                        return
                while True:
                    nxt = await _unless_stopped(it.__anext__(), stopped)
                    if nxt is None:
                        return
                    try:
                        raw = nxt.result()
                    except StopAsyncIteration:
                        return
                    except ProviderError as e:
                        prog.error = _provider_error(e)
                        return
                    if not await self._feed(job_id, token, raw, out, prog):
                        return
            finally:
                await call._aclose(it)
        finally:
            stopped.cancel()

    async def _compose(self, job_id: str, token: str, plan: RoutePlan, body: dict[str, Any], snap: Snapshot,
                       prog: _Progress, stop: asyncio.Event, stopped: asyncio.Future) -> call.StreamHandle | None:
        """A fusion or chain as a job: each finished step is a `concilium.step` event holding its answer
        (a checkpoint), so a run that takes over from a dead worker pays only for the steps not done."""
        restored = {}
        for e in await self.store.all_events(job_id):
            if e.type == "concilium.step" and (d := e.json()).get("status") == "ok" and "output" in d:
                restored[d["id"]] = {"text": d["output"], "usage": d.get("usage"), "latency_s": d.get("latency_s"),
                                     "cost_usd": d.get("cost_usd")}

        async def publish(data: dict[str, Any]) -> None:
            if await self.store.append(job_id, token, [ev("concilium.step", **data)]) is None:
                prog.fenced = True
                _trigger(prog, stop, "lost")

        async def progress(event: dict[str, Any]) -> None:
            if event["status"] not in ("ok", "restored"):  # an answered step is published by its checkpoint
                await publish(event)

        async def checkpoint(step: Any, text: str) -> None:
            await publish({"id": step.id, "role": step.role, "model": step.model, "status": "ok", "usage": step.usage,
                           "latency_s": step.latency_s, "cost_usd": step.cost_usd, "output": text})

        comp = compose.Composed(plan)
        try:
            if await _unless_stopped(compose.prepare(comp, body, snap, emit=progress, restored=restored,
                                                     checkpoint=checkpoint), stopped) is None:
                return None
        finally:
            prog.prior = comp.calls  # every call made is billed with the job, restored ones once
        if comp.error is not None or comp.synth_body is None:
            prog.error = _provider_error(comp.error or ProviderError("the composition produced nothing"))
            return None
        opening = await _unless_stopped(call.stream(plan, comp.synth_body, snap.ctx), stopped)
        if opening is None:
            return None
        try:
            return opening.result()
        except (ProviderError, call.AllCandidatesFailed) as e:
            prog.error = _provider_error(e)
            return None

    async def _feed(self, job_id: str, token: str, raw: bytes, out: OutputEvents, prog: _Progress) -> bool:
        """One upstream SSE event -> the job's events. False when the job is no longer ours."""
        try:
            obj = orjson.loads(raw[5:])
        except orjson.JSONDecodeError:
            return True
        if isinstance(obj.get("usage"), dict):
            prog.usage = obj["usage"]
        piece = ""
        for choice in obj.get("choices") or []:
            delta = choice.get("delta") or {}
            if isinstance(delta.get("content"), str):
                piece += delta["content"]
            if choice.get("finish_reason"):
                prog.finish_reason = choice["finish_reason"]
        if not piece:
            return True
        prog.produced += piece
        if len(prog.produced) <= len(prog.text):
            return True  # a re-run repeating text that was already published
        new = prog.produced[len(prog.text):]
        model = None if prog.model_noted else prog.model
        if await self.store.append(job_id, token, out.delta(new), model=model) is None:
            prog.fenced = True
            return False
        prog.model_noted = True
        prog.text += new
        return True


async def _unless_stopped(aw: Awaitable[Any], stopped: asyncio.Future[Any]) -> asyncio.Future[Any] | None:
    """Await `aw` unless the run stops first (then `aw` is cancelled): its finished future, or None."""
    fut = asyncio.ensure_future(aw)
    await asyncio.wait({fut, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if fut.done():
        return fut
    fut.cancel()
    await asyncio.gather(fut, return_exceptions=True)
    return None


def _trigger(prog: _Progress, stop: asyncio.Event, reason: str) -> None:
    if prog.stop_reason is None:
        prog.stop_reason = reason
    stop.set()


def _hard_error(hard_s: float) -> dict[str, str]:
    return {"code": "hard_timeout", "message": f"the job ran into its hard timeout of {hard_s:g}s and was stopped"}


def _provider_error(e: ProviderError | call.AllCandidatesFailed) -> dict[str, str]:
    status = e.status if isinstance(e, ProviderError) else (e.last.status if e.last is not None else 502)
    return {"code": "rate_limit_exceeded" if status == 429 else "server_error", "message": str(e)}
