"""Planning compositions: which models sit on a fusion panel, how a chain splits a request into
steps, and which specialist takes each step. Pure decisions (no calls); `pipeline/compose.py`
runs what is planned here.

- A fusion panel is the route's `fusion.panel`; with `top_k`, the k the router rates best, distinct
  upstream models first (two names for one upstream add no diversity). `samples` repeats each
  panelist with its own seed; `layers` repeats the panel, each layer reading the previous one.
- A chain with `planner: rules` is split here, deterministically: numbered or bulleted parts, else
  separate questions. A model planner's JSON is checked by `parse_plan` against the plan's schema
  and bounds (step count, depth, references); anything else is refused with the reason, and the
  caller falls back to `single`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import orjson

from concilium.core.plan import Prediction, Step
from concilium.policy.compose import PLANNER_PROMPT, Chain, Fusion
from concilium.policy.pricing import estimate_usd, prompt_tokens
from concilium.policy.schema import CATEGORIES, Policy
from concilium.router.text import prompt_chars

# What is known about a model for this request: None when it can serve it, else why not.
WhyNot = Callable[[str], "str | None"]


def est_usd(policy: Policy, model: str, n_in: float, n_out: float) -> float:
    return round(estimate_usd(policy.models[model], n_in, n_out), 8)


def fusion_steps(fusion: Fusion, policy: Policy, body: dict[str, Any], prediction: Prediction | None,
                 why_not: WhyNot, n_out: float) -> tuple[list[Step], list[str]]:
    """The panel's calls, layer by layer, and the reasons panel models were left out."""
    skipped: list[str] = []
    pool: list[str] = []
    for name in fusion.panel:
        if (why := why_not(name)) is not None:
            skipped.append(f"{name} ({why})")
        else:
            pool.append(name)
    if fusion.top_k is not None:
        pool = _diverse_top(list(dict.fromkeys(pool)), fusion.top_k, policy, prediction)
    messages = body.get("messages")
    n_in = prompt_tokens(prompt_chars(body), len(messages) if isinstance(messages, list) else 1)
    steps: list[Step] = []
    for layer in range(1, fusion.layers + 1):
        ids = [s.id for s in steps if s.layer == layer - 1]
        k = 0
        for name in pool:
            for sample in range(fusion.samples):
                k += 1
                q = prediction.quality.get(name) if prediction else None
                why = "panel" + (f", router predicts {q:.2f}" if q is not None else "")
                if layer > 1:  # it also reads the previous layer's answers: estimate them as its prompt
                    extra = n_out * len(ids)
                    why += f", layer {layer} reads layer {layer - 1}"
                else:
                    extra = 0.0
                steps.append(Step(id=f"p{k}" if layer == 1 else f"l{layer}.p{k}", role="panelist", model=name,
                                  layer=layer, seed=sample + 1 if fusion.samples > 1 else None, after=ids,
                                  reason=why, est_cost_usd=est_usd(policy, name, n_in + extra, n_out)))
    return steps, skipped


def _diverse_top(pool: list[str], k: int, policy: Policy, prediction: Prediction | None) -> list[str]:
    """The k models of `pool` the router rates best, one per upstream model before any repeats one."""
    rated = sorted(pool, key=lambda m: -(prediction.quality.get(m, 0.0) if prediction else 0.0))
    out: list[str] = []
    seen: set[tuple[str, str | None]] = set()
    for m in rated:  # distinct upstreams first
        up = (policy.models[m].model, policy.models[m].base_url)
        if up not in seen and len(out) < k:
            seen.add(up)
            out.append(m)
    out += [m for m in rated if m not in out][: k - len(out)]
    return out


# ------------------------------------------------------------------------------------ chains

_NUMBERED = re.compile(r"^\s*(?:\d{1,2}[.)]|[-*\u2022]|step\s+\d{1,2}:?)\s+", re.IGNORECASE | re.MULTILINE)
_QUESTION = re.compile(r"[^?]*\?")


def last_user_text(body: dict[str, Any]) -> str:
    for m in reversed(body.get("messages") or []):
        if isinstance(m, dict) and m.get("role") == "user":
            c = m.get("content")
            if isinstance(c, str):
                return c
            if isinstance(c, list):
                return "\n".join(p.get("text", "") for p in c if isinstance(p, dict) and p.get("type") == "text")
    return ""


def rules_plan(text: str) -> list[dict[str, Any]]:
    """Split a request into parts without a model: its numbered or bulleted lines, else its separate
    questions, else one part. Parts do not depend on each other."""
    marks = list(_NUMBERED.finditer(text))
    parts: list[str] = []
    if len(marks) >= 2:
        head = text[: marks[0].start()].strip()
        for i, m in enumerate(marks):
            end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
            part = text[m.end():end].strip()
            if part:
                parts.append(f"{head}\n{part}".strip() if head else part)
    else:
        questions = [q.strip() for q in _QUESTION.findall(text) if len(q.strip()) > 3]
        if len(questions) >= 2:
            parts = questions
    if not parts:
        parts = [text.strip()]
    return [{"id": f"s{i + 1}", "task": p, "category": None, "after": []} for i, p in enumerate(parts)]


class PlanError(ValueError):
    """A plan that cannot run, and why (the caller answers with `single` and says so)."""


_PLAN_KEYS = {"id", "task", "category", "after"}


def parse_plan(text: str, chain: Chain) -> list[dict[str, Any]]:
    """A model planner's reply -> checked steps (id, task, category, after); PlanError otherwise."""
    raw = text.strip()
    fence = re.search(r"```(?:json)?\s*(.*?)```", raw, re.DOTALL)
    if fence:
        raw = fence.group(1).strip()
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise PlanError(f"the planner's reply is not JSON ({e})") from None
    steps = data.get("steps") if isinstance(data, dict) else data
    if not isinstance(steps, list) or not steps:
        raise PlanError('the plan must be {"steps": [...]} with at least one step')
    if len(steps) > chain.max_steps:
        raise PlanError(f"the plan has {len(steps)} steps, more than max_steps ({chain.max_steps})")
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, s in enumerate(steps):
        if not isinstance(s, dict) or not isinstance(s.get("task"), str) or not s["task"].strip():
            raise PlanError(f"steps[{i}] must be an object with a non-empty string `task`")
        if unknown := set(s) - _PLAN_KEYS:
            raise PlanError(f"steps[{i}] has unknown keys {sorted(unknown)}; allowed: {sorted(_PLAN_KEYS)}")
        sid = str(s.get("id") or f"s{i + 1}")
        if sid in seen or sid in ("plan", "synth"):
            raise PlanError(f"steps[{i}]: id {sid!r} is used twice or reserved")
        cat = s.get("category")
        if cat is not None and cat not in CATEGORIES:
            cat = None  # an unknown category is left to the router
        after = s.get("after") or []
        if not isinstance(after, list) or any(a not in seen for a in after):
            raise PlanError(f"steps[{i}] ({sid}): `after` may only name earlier steps ({sorted(seen) or 'none'})")
        seen.add(sid)
        out.append({"id": sid, "task": s["task"].strip(), "category": cat, "after": [str(a) for a in after]})
    if (d := depth(out)) > chain.max_depth:
        raise PlanError(f"the plan is {d} steps deep, more than max_depth ({chain.max_depth})")
    return out


def depth(steps: list[dict[str, Any]]) -> int:
    """The longest run of steps that wait for each other (steps refer only to earlier ones)."""
    level: dict[str, int] = {}
    for s in steps:
        level[s["id"]] = 1 + max((level[a] for a in s["after"]), default=0)
    return max(level.values(), default=0)


def planner_prompt(chain: Chain) -> str:
    return (chain.planner_prompt or PLANNER_PROMPT).format(max_steps=chain.max_steps, categories="/".join(CATEGORIES))


def specialist(chain: Chain, category: str | None, fallback: str, why_not: WhyNot) -> tuple[str, str]:
    """The model for a step of `category` and why: the category's specialist, else `default`, else
    `fallback` (the route's first target), skipping any that cannot serve the request now."""
    for key in (category, "default"):
        name = chain.specialists.get(key) if key else None
        if name is None:
            continue
        if why_not(name) is None:
            return name, f"specialist for {key}" if key != "default" else "default specialist"
    return fallback, "the route's first target" + (f" (no specialist for {category})" if category else "")


def synthesis_step(steps: list[Step], model: str, policy: Policy, body: dict[str, Any], n_out: float) -> Step:
    """The synthesiser as the DAG's last node: it reads the last layer (fusion) or every step (chain)."""
    last = max((s.layer for s in steps), default=1)
    reads = [s.id for s in steps if s.role != "planner" and s.layer == last]
    messages = body.get("messages")
    n_in = prompt_tokens(prompt_chars(body), len(messages) if isinstance(messages, list) else 1) + n_out * len(reads)
    return Step(id="synth", role="synthesiser", model=model, layer=last + 1, after=reads,
                reason="the route's first target (its fallbacks behind it)", est_cost_usd=est_usd(policy, model, n_in, n_out))


def chain_steps(parts: list[dict[str, Any]], chain: Chain, policy: Policy, fallback: str, why_not: WhyNot,
                categorise: Callable[[str], str | None], n_out: float) -> list[Step]:
    """Planned parts -> steps, each with its category (the planner's, else the router's) and model."""
    steps: list[Step] = []
    for p in parts:
        cat = p.get("category") or categorise(p["task"])
        model, why = specialist(chain, cat, fallback, why_not)
        n_in = prompt_tokens(len(p["task"]), 1) + n_out * len(p["after"])
        steps.append(Step(id=p["id"], role="specialist", model=model, category=cat, task=p["task"],
                          after=list(p["after"]), reason=why, est_cost_usd=est_usd(policy, model, n_in, n_out)))
    return steps


def categoriser(dispatcher: Any, policy: Policy) -> Callable[[str], str | None]:
    """The router's category for a piece of text (None without a learned dispatcher)."""
    def categorise(text: str) -> str | None:
        if dispatcher is None:
            return None
        return dispatcher.predict({"messages": [{"role": "user", "content": text}]}, policy).category
    return categorise
