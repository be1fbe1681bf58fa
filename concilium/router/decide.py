"""router.decide(request, policy) -> RoutePlan.

One function turns a chat request into a ranked plan. Rules from the policy pick a route; when a
learned dispatcher is loaded it supplies the prediction the rules match on, and it ranks the route's
targets by the policy's objective. Models that cannot be called now (no API key, circuit open) are
moved to `skipped` with the reason, never silently dropped; so are models whose context window cannot
hold the prompt (estimated from its length, without tokenising) plus `max_tokens`.

A request that names a policy model (pinned) is answered by that model or fails: it falls back only
to the model's own `fallbacks` in the policy and those the request lists (`fallbacks`, or
OpenRouter-style `models`). It takes no fallbacks, timeout or retries from the routes.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable
from typing import Any, Protocol

from concilium.core.plan import Candidate, CascadeStep, Decision, Prediction, RoutePlan, Skipped, Step
from concilium.policy.jobs import background_reason
from concilium.policy.pricing import CHARS_PER_TOKEN, prompt_tokens
from concilium.policy.schema import Match, Policy, Route
from concilium.router import compose
from concilium.router import online as online_router
from concilium.router.objective import requested_output_tokens
from concilium.router.text import prompt_chars


class DecisionError(Exception):
    """The request cannot be routed (unknown model, no route matches). Maps to a 4xx."""

    def __init__(self, message: str, status: int = 400, code: str = "model_not_found",
                 param: str | None = "model") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.param = param


class Dispatcher(Protocol):
    def predict(self, body: dict[str, Any], policy: Policy) -> Prediction: ...

    def rank(
        self, candidates: list[str], prediction: Prediction, policy: Policy, body: dict[str, Any]
    ) -> tuple[list[tuple[str, float, float, str]], float | None, str]: ...


# Why a model cannot be called right now (None = callable); supplied by the provider registry.
Availability = Callable[[str], "str | None"]
# The context a model really serves, when it is less than the policy's context_window (None = as the
# policy says); supplied by the provider registry (a local runtime's max_seq_len).
Windows = Callable[[str], "int | None"]
# (param, why) when a model cannot serve a feature the request asks for (tools it must call, a JSON
# response format, images), None when it can; supplied by the provider registry.
Features = Callable[[str, dict[str, Any]], "tuple[str, str] | None"]


def _request_fallbacks(body: dict[str, Any], policy: Policy) -> list[str]:
    """The models the request itself asks to fall back to: OpenRouter's `models`, then `fallbacks`."""
    out: list[str] = []
    for field in ("models", "fallbacks"):
        names = body.get(field)
        if names is None:
            continue
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise DecisionError(f"{field!r} must be a list of model names", code="invalid_request", param=field)
        for name in names:
            name = policy.aliases.get(name, name)
            if name in policy.router.virtual_models:
                raise DecisionError(f"{field!r} names models to fall back to; {name!r} is a virtual model "
                                    "(ask for it as `model` instead)", code="invalid_request", param=field)
            if name not in policy.models:
                raise DecisionError(f"The model {name!r} in {field!r} does not exist; available: "
                                    f"{', '.join(sorted(policy.models))}", status=404, param=field)
            out.append(name)
    return out


def context_need(body: dict[str, Any]) -> tuple[int, int]:
    """(estimated prompt tokens, output tokens the request asks for) from lengths alone, in O(chars)
    and without a tokenizer, so a huge prompt is refused before any model tokenises it."""
    messages = body.get("messages")
    n = len(messages) if isinstance(messages, list) else 1
    return math.ceil(prompt_tokens(prompt_chars(body), n)), requested_output_tokens(body) or 0


def _prompt_words(prompt: int) -> str:
    return f"the prompt (~{prompt} tokens, estimated at {CHARS_PER_TOKEN:g} characters per token)"


def _window_reason(prompt: int, out: int, window: int, declared: int) -> str:
    held = f"context window {window}" + (f" (the policy says {declared})" if window < declared else "")
    return _prompt_words(prompt) + (f" plus max_tokens {out}" if out else "") + f" does not fit its {held}"


def window_problem(policy: Policy, name: str, prompt: int, out: int, windows: Windows | None) -> str | None:
    """Why model `name` cannot hold the prompt plus what it may write, or None. A model writes at most
    its `max_output_tokens`, and serves the smaller of its `context_window` and its real one."""
    spec = policy.models[name]
    declared = spec.context_window
    real = windows(name) if windows else None
    window = min(declared, real) if real else declared
    if spec.max_output_tokens:
        out = min(out, spec.max_output_tokens)
    return _window_reason(prompt, out, window, declared) if prompt + max(out, 1) > window else None


def _metadata(body: dict[str, Any]) -> dict[str, Any]:
    md = body.get("metadata")
    return md if isinstance(md, dict) else {}


def _matches(m: Match, body: dict[str, Any], requested: str, pred: Prediction | None) -> bool:
    if m.model is not None and requested not in m.model:
        return False
    if m.background is not None and bool(body.get("background")) != m.background:
        return False
    if m.reasoning_effort is not None and body.get("reasoning_effort") not in m.reasoning_effort:
        return False
    md = _metadata(body)
    if m.metadata is not None and any(str(md.get(k)) != v for k, v in m.metadata.items()):
        return False
    if m.tags is not None:
        tags = md.get("tags")
        have = set(tags.split(",")) if isinstance(tags, str) else set(tags or [])
        if not set(m.tags) <= have:
            return False
    if m.category is not None and (pred is None or pred.category not in m.category):
        return False
    if m.difficulty is not None:
        if pred is None or pred.difficulty is None:
            return False
        if m.difficulty.min is not None and pred.difficulty < m.difficulty.min:
            return False
        if m.difficulty.max is not None and pred.difficulty > m.difficulty.max:
            return False
    if m.pii is not None and (pred is None or pred.pii is None or pred.pii != m.pii):
        return False
    return True


def _describe(m: Match) -> str:
    parts = [f"{k}={v}" for k, v in m.model_dump(exclude_none=True).items()]
    return " and ".join(parts) if parts else "always"


def _needs_prediction(policy: Policy) -> bool:
    return any(r.match.category or r.match.difficulty or r.rank or r.strategy != "single" for r in policy.routes)


def _cascade_steps(route: Route, prediction: Prediction | None, why_not: Any) -> tuple[list[CascadeStep], float | None]:
    """The route's drafts as plan steps, and the predicted chance that every scored draft fails."""
    c = route.cascade
    assert c is not None
    steps: list[CascadeStep] = []
    p_all_fail: float | None = 1.0
    for name in c.drafts:
        q = prediction.quality.get(name) if prediction else None
        if (why := why_not(name)) is not None:
            steps.append(CascadeStep(model=name, action="skip", router_quality=q, reason=why))
            continue
        if q is not None and c.skip_below is not None and q < c.skip_below:
            steps.append(CascadeStep(model=name, action="skip", router_quality=q,
                                     reason=f"router predicts quality {q:.2f} < skip_below {c.skip_below:g}"))
            continue
        if q is not None and c.trust_above is not None and q >= c.trust_above:
            steps.append(CascadeStep(model=name, action="trust", router_quality=q,
                                     reason=f"router predicts quality {q:.2f} >= trust_above {c.trust_above:g}"))
            return steps, 0.0  # served as it is: no escalation
        steps.append(CascadeStep(model=name, threshold=c.threshold, router_quality=q,
                                 reason=f"draft, accepted when its score >= {c.threshold:g}"))
        p_all_fail = None if q is None or p_all_fail is None else p_all_fail * (1.0 - q)
    return steps, p_all_fail


def decide(
    body: dict[str, Any],
    policy: Policy,
    *,
    dispatcher: Dispatcher | None = None,
    availability: Availability | None = None,
    windows: Windows | None = None,
    features: Features | None = None,
    request_id: str | None = None,
    pii: bool | None = None,
    online: Any = None,
) -> RoutePlan:
    requested = body.get("model")
    if not isinstance(requested, str) or not requested:
        raise DecisionError("'model' is required: a model name or a virtual model such as "
                            f"{policy.router.virtual_models[0]!r}", code="invalid_request")
    rid = request_id or uuid.uuid4().hex
    reasons: list[str] = []
    if requested in policy.aliases:  # a request for an alias is a request for its target, pinned or routed
        reasons.append(f"alias {requested} -> {policy.aliases[requested]}")
        requested = policy.aliases[requested]

    asked = _request_fallbacks(body, policy)
    if requested in policy.models and policy.models[requested].kind == "embedding":
        raise DecisionError(f"{requested!r} is an embedding model; it answers POST /v1/embeddings, not chat",
                            code="model_not_supported")
    if requested in policy.models:
        # The first route listing the model decides only whether it runs as a background job.
        base_route: Route | None = next((r for r in policy.routes if requested in r.targets[:1]), None)
        timing: Route | None = None
        targets = [requested]
        fallbacks = [f for f in policy.models[requested].fallbacks + asked if f != requested]
        route_name, rule = "pinned", f"client asked for {requested}"
        reasons.append(f"pinned: client asked for {requested}"
                       + (f", fallbacks {', '.join(dict.fromkeys(fallbacks))}" if fallbacks else ", no fallbacks"))
        prediction = None
        ranked: list[tuple[str, float, float, str]] | None = None
        threshold = objective = None
    elif requested in policy.router.virtual_models:
        prediction = None
        if dispatcher is not None and _needs_prediction(policy):
            prediction = dispatcher.predict(body, policy)
        if pii is not None:
            prediction = prediction or Prediction()
            prediction.pii = pii
        base_route = next((r for r in policy.routes if _matches(r.match, body, requested, prediction)), None)
        if base_route is None:
            raise DecisionError(f"no route in the policy matches this request for {requested!r}",
                                status=400, code="no_route")
        route_name, rule = base_route.name, _describe(base_route.match)
        reasons.append(f"route {base_route.name}: {rule}")
        targets, fallbacks = list(base_route.targets), list(base_route.fallbacks) + asked
        timing = base_route
        ranked, threshold, objective = None, None, None
        if prediction is not None and dispatcher is not None and base_route.rank and len(targets) > 1:
            ranked, threshold, objective = dispatcher.rank(targets, prediction, policy, body)
            if ranked:
                reasons.append(f"ranked by {objective}")
        if prediction is not None and prediction.category:
            reasons.append(f"category={prediction.category}"
                           + (f" difficulty={prediction.difficulty:.2f}" if prediction.difficulty is not None else ""))
    else:
        known = sorted(policy.models) + list(policy.router.virtual_models) + sorted(policy.aliases)
        raise DecisionError(f"The model {requested!r} does not exist; available: {', '.join(known)}",
                            status=404, code="model_not_found")

    route_timeout = timing.timeout_s if timing else None

    def timeout_of(name: str) -> float | None:
        """The model's own per-attempt limit, held to the route's when that is stricter."""
        own = policy.models[name].timeout_s
        return None if own is None else min(own, route_timeout) if route_timeout else own

    order: list[Candidate] = []
    if ranked:
        for name, q, cost, why in ranked:
            order.append(Candidate(model=name, provider=policy.models[name].provider, predicted_quality=q,
                                   est_cost_usd=cost, timeout_s=timeout_of(name), reason=why))
    else:
        for name in targets:
            q = prediction.quality.get(name) if prediction else None
            order.append(Candidate(model=name, provider=policy.models[name].provider,
                                   predicted_quality=q, timeout_s=timeout_of(name), reason="target"))
    seen = {c.model for c in order}
    for name in fallbacks:
        if name not in seen:
            seen.add(name)
            q = prediction.quality.get(name) if prediction else None
            order.append(Candidate(model=name, provider=policy.models[name].provider,
                                   predicted_quality=q, timeout_s=timeout_of(name), reason="fallback"))

    prompt_est, out_tokens = context_need(body)
    too_long: dict[str, str] = {}
    for c in order:
        if (why := window_problem(policy, c.model, prompt_est, out_tokens, windows)) is not None:
            too_long[c.model] = why
    if order and len(too_long) == len(order):
        raise DecisionError(
            f"{_prompt_words(prompt_est)} fits no model this request may use: "
            + "; ".join(f"{m}: {why.removeprefix(_prompt_words(prompt_est)).strip()}" for m, why in too_long.items())
            + ". Shorten the messages or lower max_tokens",
            status=400, code="context_length_exceeded", param="messages")

    # Routed requests skip models that cannot serve the request's features; a pinned model answers
    # or refuses itself (a 400 naming the field).
    unable: dict[str, str] = {}
    fields: list[str] = []
    if features is not None and route_name != "pinned":
        for c in order:
            if (no := features(c.model, body)) is not None:
                unable[c.model] = f"cannot serve {no[0]}: {no[1]}"
                fields.append(no[0])
        if order and len(unable) == len(order):
            raise DecisionError(f"no model of route {route_name!r} serves this request: "
                                + "; ".join(f"{m}: {why}" for m, why in unable.items()),
                                status=400, code="unsupported_parameter", param=fields[0])

    callable_: list[Candidate] = []
    skipped: list[Skipped] = []
    for c in order:
        why = too_long.get(c.model) or unable.get(c.model) or (availability(c.model) if availability else None)
        if why:
            skipped.append(Skipped(model=c.model, reason=why))
        else:
            callable_.append(c)
    if skipped:
        reasons.append("skipped " + ", ".join(f"{s.model} ({s.reason})" for s in skipped))
    def why_not(name: str) -> str | None:
        if (why := window_problem(policy, name, prompt_est, out_tokens, windows)) is not None:
            return why
        if features is not None and (no := features(name, body)) is not None:
            return f"cannot serve {no[0]}: {no[1]}"
        return availability(name) if availability else None

    steps: list[CascadeStep] = []
    escalation_p: float | None = None
    cascade = base_route.cascade if base_route is not None and route_name != "pinned" else None
    if cascade is not None and base_route is not None and base_route.strategy == "cascade":
        steps, escalation_p = _cascade_steps(base_route, prediction, why_not)
        live = [s for s in steps if s.action != "skip"]
        for s in steps:
            if s.action == "skip":
                reasons.append(f"cascade: skipped draft {s.model} ({s.reason})")
        if live:
            reasons.insert(0, f"cascade: draft {live[0].model}"
                           + (" (trusted)" if live[0].action == "trust" else f", then {callable_[0].model}"
                              if callable_ else ""))
    strategy = "cascade" if any(s.action != "skip" for s in steps) else "single"
    decision = None
    if (online is not None and online.enabled and dispatcher is not None and prediction is not None
            and not prediction.pii and base_route is not None and route_name != "pinned"
            and base_route.strategy == "single" and base_route.rank and len(callable_) > 1):
        callable_, decision = _learned_order(callable_, prediction, policy, body, dispatcher, online, reasons)
    composed: list[Step] = []
    pending: tuple[int, list[str]] = (0, [])
    if base_route is not None and route_name != "pinned" and base_route.strategy in ("fusion", "chain") and callable_:
        n_out = out_tokens or policy.router.default_output_tokens
        if base_route.fusion is not None:
            composed, left_out = compose.fusion_steps(base_route.fusion, policy, body, prediction, why_not, n_out)
            if left_out:
                reasons.append("fusion: left out " + ", ".join(left_out))
            if len(composed) < base_route.fusion.quorum * base_route.fusion.layers:
                reasons.append(f"fusion: {len(composed)} panel calls cannot meet quorum {base_route.fusion.quorum}; "
                               "answering with single")
                composed = []
            else:
                strategy = "fusion"
                reasons.insert(0, f"fusion: {len({s.model for s in composed})} panel models, "
                               f"{len(composed)} calls, synthesised by {callable_[0].model}")
        elif base_route.chain is not None:
            composed, pending = _chain_plan(base_route.chain, policy, body, callable_[0].model, why_not,
                                            dispatcher, n_out)
            if not composed:
                reasons.append(f"chain: the request has {pending[0]} parts, more than max_steps "
                               f"({base_route.chain.max_steps}): answered as single")
                pending = (0, [])
            else:
                strategy = "chain"
                planned = (f"planned by {base_route.chain.planner}" if pending[0]
                           else f"{len(composed)} steps ({', '.join(s.model for s in composed)})")
                reasons.insert(0, f"chain: {planned}, synthesised by {callable_[0].model}")
        if composed:
            composed.append(compose.synthesis_step(composed, callable_[0].model, policy, body, n_out))
    if callable_ and strategy == "single":
        reasons.insert(0, f"chose {callable_[0].model}")

    why_background = background_reason(body, policy, base_route, prediction)
    mode = "background" if why_background else "interactive"
    if why_background:
        reasons.append(f"background: {why_background}")
    return RoutePlan(
        request_id=rid,
        requested_model=requested,
        route=route_name,
        mode=mode,
        candidates=callable_,
        skipped=skipped,
        reasons=reasons,
        prediction=prediction,
        rule=rule,
        objective=objective,
        threshold=threshold,
        timeout_s=route_timeout or policy.limits.default_timeout_s,
        retries=timing.retries if timing and timing.retries is not None else policy.retry.attempts,
        queue=(base_route.queue if base_route else None),
        strategy=strategy,
        cascade=steps,
        scorer=({"spec": cascade.scorer} if steps and cascade is not None else None),
        escalation_p=escalation_p,
        steps=composed,
        pending_steps=pending[0],
        pending_models=pending[1],
        decision=decision,
    )


def artifact_version(dispatcher: Any) -> str:
    """The trained router's version: `static (<when it was trained>)`."""
    created = getattr(getattr(dispatcher, "artifact", None), "meta", {}).get("created")
    return f"static ({created})" if created else "static"


def _learned_order(cands: list[Candidate], prediction: Prediction, policy: Policy, body: dict[str, Any],
                   dispatcher: Any, online: Any, reasons: list[str]) -> tuple[list[Candidate], Decision | None]:
    """router.learning: the live router's order of the route's targets (the trained router's, or the
    online learner's), with the exploration draw; the fallbacks stay behind them."""
    ranked = [c for c in cands if c.reason != "fallback"]
    rest = [c for c in cands if c.reason == "fallback"]
    names = [c.model for c in ranked]
    if len(names) < 2:
        return cands, None
    x = online_router.context(prediction)
    q = {m: float(prediction.quality.get(m, 0.5)) for m in names}
    known = dispatcher.model_map(policy)
    adjusted = online.learner.adjusted(q, x, unknown={m for m in names if known.get(m) is None})
    learned, _, _ = dispatcher.rank(names, prediction.model_copy(update={"quality": {**prediction.quality,
                                                                                     **adjusted}}), policy, body)
    learner_order = [r[0] for r in learned]
    live_order = learner_order if online.live == "learner" else names
    chosen, p, explored = online_router.explore(live_order, live_order[0], online.explore)
    by = {c.model: c for c in ranked}
    order = [by[chosen]] + [by[m] for m in live_order if m != chosen]
    if online.live == "learner":
        order = [c.model_copy(update={"predicted_quality": adjusted[c.model], "reason": "ranked by the online learner"})
                 for c in order]
    choices = {"static": names[0], "learner": learner_order[0]}
    reasons.append(f"learning: {online.live} router live" + (f", explored {chosen} (p={p:.3f})" if explored else "")
                   + ("" if online.live == "learner" else f"; the learner in shadow would pick {learner_order[0]}"))
    version = online.version if online.live == "learner" else artifact_version(dispatcher)
    decision = Decision(x=x, q={m: round(v, 4) for m, v in q.items()}, choices=choices, live=online.live,
                        chosen=chosen, propensity=round(p, 6), explored=explored, version=version)
    return order + rest, decision


def _chain_plan(chain: Any, policy: Policy, body: dict[str, Any], first: str, why_not: Callable[[str], str | None],
                dispatcher: Any, n_out: float) -> tuple[list[Step], tuple[int, list[str]]]:
    """A rules chain: all its steps now. A model-planned chain: the planner's call, and the steps it
    may still add (at most max_steps, on the specialists or the route's first target)."""
    if chain.planner != "rules":
        n_in = prompt_tokens(prompt_chars(body) + 600, 2)
        planner = Step(id="plan", role="planner", model=chain.planner, reason="asked for a JSON plan",
                       est_cost_usd=compose.est_usd(policy, chain.planner, n_in, n_out))
        models = list(dict.fromkeys([*chain.specialists.values(), first]))
        return [planner], (chain.max_steps, models)
    parts = compose.rules_plan(compose.last_user_text(body))
    if len(parts) > chain.max_steps:
        return [], (len(parts), [])  # oversized: the caller answers with single and says why
    return compose.chain_steps(parts, chain, policy, first, why_not, compose.categoriser(dispatcher, policy),
                               n_out), (0, [])



def decide_embeddings(body: dict[str, Any], policy: Policy, *, availability: Availability | None = None,
                      request_id: str | None = None) -> RoutePlan:
    """The plan of an embeddings request: the named embedding model (or alias) and no other, since
    vectors from another model cannot be compared with its own; its own timeout and the policy's
    retries. A virtual model or a chat model is a 400 listing the embedding models."""
    requested = body.get("model")
    embedding = sorted(n for n, s in policy.models.items() if s.kind == "embedding")
    listed = ", ".join(embedding) or "none: mark one with `kind: embedding`"
    if not isinstance(requested, str) or not requested:
        raise DecisionError(f"'model' is required: an embedding model ({listed})", code="invalid_request")
    reasons = []
    if requested in policy.aliases:
        reasons.append(f"alias {requested} -> {policy.aliases[requested]}")
        requested = policy.aliases[requested]
    spec = policy.models.get(requested)
    if spec is None or spec.kind != "embedding":
        what = ("a virtual model" if requested in policy.router.virtual_models else
                "a chat model" if spec is not None else None)
        if what is None:
            raise DecisionError(f"The model {requested!r} does not exist; embedding models: {listed}",
                                status=404, code="model_not_found")
        raise DecisionError(f"{requested!r} is {what}; embeddings come from an embedding model: {listed}",
                            code="model_not_supported")
    why = availability(requested) if availability else None
    cand = Candidate(model=requested, provider=spec.provider, timeout_s=spec.timeout_s, reason="target")
    reasons.insert(0, f"skipped {requested} ({why})" if why else f"chose {requested}")
    return RoutePlan(request_id=request_id or uuid.uuid4().hex, requested_model=requested, route="pinned",
                     candidates=[] if why else [cand], skipped=[Skipped(model=requested, reason=why)] if why else [],
                     reasons=reasons, rule=f"client asked for {requested}",
                     timeout_s=policy.limits.default_timeout_s, retries=policy.retry.attempts)
