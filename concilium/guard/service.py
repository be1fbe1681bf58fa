"""The guard: who is calling (keys), what they may use, and what they may still spend.

`Guard.admit()` runs after the router's decision and before any model is called: it checks the key's
allowed models and routes, then reserves the request's maximum cost and counts it against the rate
limits, atomically over every scope (key, team, models). The `Ticket` it returns settles the actual
usage exactly once, on whichever way the request ends. With no keys configured the guard is inactive
and the request path does not touch it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

from concilium.core.errors import APIError
from concilium.core.plan import RoutePlan, Skipped
from concilium.guard.keys import Key, KeyTable, Scope, merge, read_key_file
from concilium.guard.store import NANO, Charge, Denied, ScopeUsage, Store, StoreUnavailable, Window
from concilium.guard.store_memory import MemoryStore
from concilium.pipeline.compose import downgraded
from concilium.policy.keys import KeysSection
from concilium.policy.loader import PolicyError
from concilium.policy.pricing import cost_nano, max_cost_nano, prompt_tokens_bound

log = logging.getLogger("concilium.guard")
RESERVATION_TTL_S = 3600.0  # a crashed replica's reservations lapse after this
KEY_FILE_CHECK_S = 1.0
STATE_KEY = "key"  # request.state.key: the caller's Key (jobs use its name as the owner)


def _nano(usd: float | None) -> int | None:
    return None if usd is None else round(usd * 1e9)


def scope_charge(s: Scope, nano: int, tokens: int) -> Charge:
    b, r = s.limits.budget, s.limits.rate
    return Charge(s.name, nano, tokens,
                  cap_day=_nano(b.usd_per_day) if b else None, cap_month=_nano(b.usd_per_month) if b else None,
                  rpm=r.requests_per_min if r else None, tpm=r.tokens_per_min if r else None)


_REASONS = {
    "usd_per_day": ("budget per day", "budget_exceeded", "insufficient_quota"),
    "usd_per_month": ("budget per month", "budget_exceeded", "insufficient_quota"),
    "requests_per_min": ("requests per minute", "rate_limit_exceeded", "rate_limit_error"),
    "tokens_per_min": ("tokens per minute", "rate_limit_exceeded", "rate_limit_error"),
}


def usd(nano: int, up: bool = False) -> str:
    """Money for people: cents from $1 up, else four significant digits (never "$0.00" for a cap of
    $0.0005). `up` rounds up, for what a request may cost."""
    x = Decimal(nano) / NANO
    if x == 0:
        return "$0.00"
    mode = ROUND_CEILING if up else ROUND_HALF_UP
    if abs(x) >= 1:
        return f"${x.quantize(Decimal('0.01'), rounding=mode):,.2f}"
    q = x.quantize(Decimal(1).scaleb(x.adjusted() - 3), rounding=mode)
    whole, _, frac = format(q, "f").rstrip("0").partition(".")
    return f"${whole}.{frac.ljust(2, '0')}"


def _who(scope: str) -> str:
    kind, _, ident = scope.partition(":")
    return {"key": "this key", "team": f"team {ident!r}", "model": f"model {ident!r}",
            "key-model": f"this key's use of {ident.split('/', 1)[-1]!r}"}.get(kind, scope)


def denied_error(d: Denied, headers: dict[str, str], usage: ScopeUsage | None = None, need: int | None = None,
                 on: str = "") -> APIError:
    """The 429 for a denial. For budgets, `usage` (the scope's spend and holds) and `need` (what this
    request may cost, `on` saying where) let the message say what is left and what was asked for."""
    words, code, typ = _REASONS[d.reason]
    who = _who(d.scope)
    wait = max(1, math.ceil(d.retry_after_s))
    headers = {**headers, "retry-after": str(wait)}
    if not d.reason.startswith("usd"):
        return APIError(429, f"{who} is over its {words} ({int(d.limit)}); retry after {wait}s", code=code,
                        type=typ, headers=headers)
    cap = round(d.limit * NANO)
    in_flight = d.retry_after_s <= 1.0
    if usage is None:
        detail = "requests in flight hold the rest; retry when they finish" if in_flight else f"retry after {wait}s"
        return APIError(429, f"{who} has not enough left of its {words} ({usd(cap)}) for this request; {detail}",
                        code=code, type=typ, headers=headers)
    spent = usage.spent_day if d.reason == "usd_per_day" else usage.spent_month
    if spent >= cap:
        return APIError(429, f"{who} has spent its {words} ({usd(spent)} of {usd(cap)}); retry after {wait}s",
                        code=code, type=typ, headers=headers)
    left = max(0, cap - spent - usage.reserved)
    held = f", {usd(usage.reserved)} held by requests in flight" if usage.reserved else ""
    msg = (f"{who} has {usd(left)} left of its {words} of {usd(cap)} "
           f"({usd(spent) + ' spent' if spent else 'nothing spent'}{held})"
           + (f"; this request may cost up to {usd(need, up=True)}{on}" if need is not None else ""))
    if need is not None and need > cap - spent:
        msg += ": lower max_tokens or shorten the prompt" + ("" if need <= cap else ", it can never fit this budget")
        if need <= cap:
            msg += f", or retry after {wait}s"
    else:
        msg += "; requests in flight hold the rest: retry when they finish" if in_flight else f"; retry after {wait}s"
    return APIError(429, msg, code=code, type=typ, headers=headers)


@dataclass
class Ticket:
    """One admitted request's reservation; `done()` settles it exactly once."""

    guard: Guard
    rid: str
    key: Key
    costs: dict[str, int]  # model -> the most it may cost (nano-USD), as reserved
    counted_tokens: int
    out_tokens: int
    scopes: list[Scope]
    model_scopes: dict[str, tuple[Scope, ...]]
    specs: dict[str, Any]
    # The calls before the answer (a cascade's drafts, a composition's panel or steps): model -> the
    # sum reserved for them; `costs` holds the most one call to each model may cost.
    prior_costs: dict[str, int] = field(default_factory=dict)
    top: int | None = None  # what was reserved for the answer (the priciest candidate)
    started: float = field(default_factory=time.monotonic)
    settled: bool = False

    def done(self, model: str | None, usage: dict | None, outcome: str, prior: Sequence[Any] = ()) -> None:
        """outcome: ok | failed (no model answered: nothing to pay) | cached (answered from the response
        cache: nothing to pay) | anything else (unknown: keep the reservation as the charge). `prior`: the request's earlier calls (a cascade's drafts, each
        with `model`, `usage`, `seconds`), paid whatever the outcome."""
        if self.settled:
            return
        self.settled = True
        reserve_top = self.top if self.top is not None else max(
            (c for m, c in self.costs.items() if m not in self.prior_costs), default=0)
        spent, tokens = 0, 0
        if outcome == "cached":
            model, outcome = None, "failed"  # free: the reservation is released
        if outcome != "failed" and model is not None and model in self.specs:
            cost = cost_nano(self.specs[model], usage, time.monotonic() - self.started, self.costs[model])
            spent = self.costs[model] if cost is None else cost
            tokens = int((usage or {}).get("total_tokens") or 0) or (self.counted_tokens + self.out_tokens)
        elif outcome != "failed":  # charged at the reservation: every draft too
            spent, tokens = reserve_top + sum(self.prior_costs.values()), self.counted_tokens + self.out_tokens
        per_model: dict[str | None, tuple[int, int]] = {model: (spent, tokens)}
        for c in prior:  # each call is paid once, at what it used (its reservation when it reported nothing)
            if c.model not in self.specs or (not getattr(c, "ok", True) and c.usage is None):
                continue  # a call the provider refused with an error: nothing to pay
            cost = cost_nano(self.specs[c.model], c.usage, c.seconds, self.costs[c.model])
            nano = self.costs[c.model] if cost is None else cost
            toks = int((c.usage or {}).get("total_tokens") or 0) or sum(
                int((c.usage or {}).get(k) or 0) for k in ("prompt_tokens", "completion_tokens"))
            s0, t0 = per_model.get(c.model, (0, 0))
            per_model[c.model] = (s0 + nano, t0 + toks)
        total = sum(s for s, _ in per_model.values())
        total_tokens = sum(t for _, t in per_model.values())
        charges = [scope_charge(s, total, total_tokens - self.counted_tokens) for s in self.scopes]
        for m, scopes in self.model_scopes.items():
            mine, toks = per_model.get(m, (0, 0))
            charges += [scope_charge(s, mine, toks - self.counted_tokens) for s in scopes]
        self.guard.count_spend(self.key.name, total)
        if charges:  # a key without limits reserved nothing
            self.guard.settle(self.rid, charges)


class Guard:
    def count_spend(self, key: str, nano: int) -> None:
        """The spend-per-key metric (`concilium_key_spend_usd`), when the policy state has metrics."""
        metrics = getattr(self.state, "metrics", None)
        if nano and metrics is not None and hasattr(metrics, "key_spend"):
            metrics.child(metrics.key_spend, key).inc(nano / NANO)

    def __init__(self, state: Any, settings: Any) -> None:
        self.state = state
        self.settings = settings
        self.key_file = Path(settings.key_file_path)
        self._snap: Any = None
        self._file_mtime: float | None = None
        self._file_keys: KeysSection | None = None
        self._checked = 0.0
        self._table = KeyTable(KeysSection())
        self._store: Store | None = None
        self._tasks: set[asyncio.Task] = set()
        self.table()  # a broken key file at startup is an error, not a warning
        if self._file_error:
            raise PolicyError(str(self.key_file), [("", self._file_error)])

    # -- keys -------------------------------------------------------------------------------------
    _file_error: str | None = None

    def _read_file(self) -> None:
        try:
            mtime = os.stat(self.key_file).st_mtime
        except OSError:
            mtime = None
        if mtime == self._file_mtime:
            return
        self._file_mtime = mtime
        try:
            self._file_keys = read_key_file(self.key_file) if mtime is not None else None
            self._file_error = None
        except PolicyError as e:
            self._file_error = str(e)
            log.error("key file refused, keeping the previous keys:\n%s", e)
        self._snap = None  # rebuild

    def table(self) -> KeyTable:
        """The keys in force (policy + key file); cheap to call on every request."""
        snap = self.state.current
        now = time.monotonic()
        if now - self._checked >= KEY_FILE_CHECK_S:
            self._checked = now
            self._read_file()
        if snap is not self._snap:
            try:
                self._table = KeyTable(merge(snap.policy.keys, self._file_keys, str(self.key_file)))
            except PolicyError as e:
                log.error("keys refused, keeping the previous keys:\n%s", e)
            self._snap = snap
        return self._table

    @property
    def active(self) -> bool:
        return len(self.table()) > 0

    # -- store --------------------------------------------------------------------------------------
    @property
    def store(self) -> Store:
        if self._store is None:
            url = self.settings.redis_url
            if url and self.settings.guard_store != "memory":
                from concilium.guard.store_failover import FailoverStore
                from concilium.guard.store_redis import RedisStore

                self._store = FailoverStore(RedisStore(url))
            else:
                self._store = MemoryStore()
        return self._store

    def settle(self, rid: str, charges: list[Charge]) -> None:
        w = Window.at()
        store = self.store
        if isinstance(store, MemoryStore):
            store.settle_now(rid, charges, w)
            return
        task = asyncio.ensure_future(self._settle(store, rid, charges, w))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _settle(self, store: Store, rid: str, charges: list[Charge], w: Window) -> None:
        try:
            await store.settle(rid, charges, w)
        except Exception:
            log.exception("settling request %s failed", rid)

    async def close(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._store is not None:
            await self._store.close()

    # -- admission ----------------------------------------------------------------------------------
    def check_access(self, request: Any, body: dict[str, Any], plan: RoutePlan, snap: Any,
                     headers: dict[str, str]) -> tuple[Key, list[Any]]:
        """The caller's key and the candidates it may use; APIError 401/403 otherwise."""
        key: Key | None = request.scope.get("state", {}).get(STATE_KEY)
        if key is None:
            raise APIError(401, "missing API key: send `Authorization: Bearer <key>`", code="invalid_api_key",
                           headers={"www-authenticate": "Bearer"})
        e = key.entry
        requested = body.get("model")
        if e.models is not None and requested not in e.models:
            raise APIError(403, f"this key may not use model {requested!r}; allowed: {', '.join(e.models)}",
                           code="model_not_allowed", param="model", headers=headers)
        if e.routes is not None and plan.route not in e.routes:
            raise APIError(403, f"this key may not use route {plan.route!r}; allowed: {', '.join(e.routes)}",
                           code="route_not_allowed", headers=headers)
        candidates = list(plan.candidates)
        if e.models is not None and requested in snap.policy.models:  # pinned: stay within what is allowed
            candidates = [c for c in candidates if c.model in e.models]
            if not candidates:
                raise APIError(403, "none of the models this request may reach ("
                               + ", ".join(c.model for c in plan.candidates) + ") is allowed for this key",
                               code="model_not_allowed", param="model", headers=headers)
        return key, candidates

    async def admit(self, request: Any, body: dict[str, Any], plan: RoutePlan, snap: Any,
                    headers: dict[str, str]) -> tuple[Ticket, RoutePlan]:
        """Check access and reserve; raise APIError 401/403/429. May narrow the plan's candidates."""
        key, candidates = self.check_access(request, body, plan, snap, headers)
        e = key.entry
        prompt = prompt_tokens_bound(len(await request.body()))
        asked = body.get("max_completion_tokens") or body.get("max_tokens")
        out = asked if isinstance(asked, int) and asked > 0 else e.default_max_tokens
        if asked is None and key.has_budget:
            body["max_tokens"] = out  # the reservation must bound what the model may write
        specs = {c.model: snap.policy.models[c.model] for c in candidates}
        # A GPU-second price is bounded by the time every attempt on the model may take.
        seconds = {c.model: (c.timeout_s or plan.timeout_s or snap.policy.limits.default_timeout_s)
                   * (plan.retries + 1) for c in candidates}
        all_costs = {m: max_cost_nano(specs[m], prompt, out, seconds[m]) for m in specs}
        # A cascade may pay every draft, a composition every panel call or step, and then the priciest
        # candidate: the worst case is their sum, reserved before the first call.
        prior_costs = self._prior_costs(plan, snap, specs, all_costs, prompt, out)
        rid = plan.request_id + "-" + uuid.uuid4().hex[:8]
        dropped: list[Skipped] = []
        while True:
            if not candidates:
                raise APIError(429, "every model this request may use is over its limits", code="budget_exceeded",
                               type="insufficient_quota", headers=headers)
            costs = {c.model: all_costs[c.model] for c in candidates}
            top = max(costs.values())
            charges = [scope_charge(s, top + sum(prior_costs.values()), prompt) for s in key.scopes]
            model_scopes = {m: key.model_scopes[m] for m in [*costs, *prior_costs] if m in key.model_scopes}
            for m, scopes in model_scopes.items():
                charges += [scope_charge(s, costs.get(m, 0) + prior_costs.get(m, 0), prompt) for s in scopes]
            if not charges:
                denied = None
            else:
                denied = await self.store.reserve(rid, charges, RESERVATION_TTL_S, Window.at())
            if denied is None:
                break
            if prior_costs and plan.strategy in ("fusion", "chain") and _downgrades(plan, snap):
                # the key cannot afford the fan-out: the policy says answer with `single` instead
                plan = downgraded(plan, f"the key's budget cannot cover the {plan.strategy}'s "
                                  f"{len(plan.steps) - 1 + plan.pending_steps} calls")
                prior_costs = {}
                continue
            over = next((m for m, ss in model_scopes.items() if any(x.name == denied.scope for x in ss)), None)
            if over in costs and len(candidates) > 1:  # that model is over its limits: try the others
                candidates = [c for c in candidates if c.model != over]
                dropped.append(Skipped(model=over, reason=f"{_who(denied.scope)} is over its "
                                       f"{_REASONS[denied.reason][0]}"))
                continue
            costly = [c.model for c in candidates if costs[c.model] == top]
            if over is None and denied.reason.startswith("usd") and len(costly) < len(candidates):
                # the key (or team) cannot afford the priciest candidates: the cheaper ones may still do
                candidates = [c for c in candidates if c.model not in costly]
                dropped += [Skipped(model=m, reason=f"may cost up to {usd(top, up=True)}, more than "
                                    f"{_who(denied.scope)} can spend now") for m in costly]
                continue
            need = costs.get(over, prior_costs.get(over, top)) if over is not None else top + sum(prior_costs.values())
            on = f" on {over or candidates[0].model} (a prompt of up to {prompt} tokens and max_tokens {out})"
            try:
                usage = await self.store.usage(denied.scope, None, None, Window.at())
            except StoreUnavailable:
                usage = None
            raise denied_error(denied, headers, usage, need, on)
        if dropped:
            reasons = list(plan.reasons)
            if reasons and reasons[0].startswith("chose "):
                reasons[0] = f"chose {candidates[0].model}"
            reasons.append("skipped " + ", ".join(f"{d.model} ({d.reason})" for d in dropped))
            plan = plan.model_copy(update={"candidates": candidates, "skipped": plan.skipped + dropped,
                                           "reasons": reasons})
        elif len(candidates) != len(plan.candidates):
            plan = plan.model_copy(update={"candidates": candidates})
        per_call = {m: all_costs[m] for m in prior_costs}
        ticket = Ticket(self, rid, key, {**per_call, **costs}, prompt, out, list(key.scopes), model_scopes, specs,
                        prior_costs, top=top)
        return ticket, plan

    @staticmethod
    def _prior_costs(plan: RoutePlan, snap: Any, specs: dict[str, Any], all_costs: dict[str, int],
                     prompt: int, out: int) -> dict[str, int]:
        """model -> the most the calls before the answer may cost on it (adds their specs and per-call
        costs to `specs` and `all_costs`). A model-planned chain reserves its `pending_steps` on the
        priciest model they may use."""
        models = snap.policy.models
        before = [s.model for s in plan.cascade if s.action != "skip"]
        before += [s.model for s in plan.steps if s.role != "synthesiser"]
        for m in {*before, *plan.pending_models}:
            if m not in all_costs and m in models:
                specs[m] = models[m]
                t = models[m].timeout_s or plan.timeout_s or snap.policy.limits.default_timeout_s
                all_costs[m] = max_cost_nano(specs[m], prompt, out, t * (plan.retries + 1))
        prior: dict[str, int] = {}
        for m in before:
            if m in all_costs:
                prior[m] = prior.get(m, 0) + all_costs[m]
        if plan.pending_steps and plan.pending_models:
            worst = max((m for m in plan.pending_models if m in all_costs), key=all_costs.__getitem__, default=None)
            if worst is not None:
                prior[worst] = prior.get(worst, 0) + plan.pending_steps * all_costs[worst]
        return prior


def _downgrades(plan: RoutePlan, snap: Any) -> bool:
    route = next((r for r in snap.policy.routes if r.name == plan.route), None)
    section = getattr(route, plan.strategy, None) if route is not None else None
    return section is not None and section.on_budget == "single"

