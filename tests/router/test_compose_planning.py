"""Planning compositions without calling a model: panels, the rules planner, checking a model's plan,
and keeping a composition's steps away from models a PII prompt may not reach."""

from __future__ import annotations

import json
import re

import pytest

from concilium.core.plan import Prediction
from concilium.guard.privacy import restrict
from concilium.policy.compose import Chain
from concilium.policy.loader import parse_policy
from concilium.router import compose
from concilium.router.decide import decide

URL = "http://127.0.0.1:9/v1"


def policy(route: str, extra: str = "") -> object:
    return parse_policy(f"""
version: 1
models:
  a: {{provider: openai, base_url: "{URL}", model: same-up, tags: [private]}}
  a2: {{provider: openai, base_url: "{URL}", model: same-up}}
  b: {{provider: openai, base_url: "{URL}", model: b-up}}
  s: {{provider: openai, base_url: "{URL}", model: s-up, tags: [private]}}
router: {{virtual_models: [concilium/auto], learned: false}}
routes:
  - name: r
    targets: [s]
    rank: false
{route}
{extra}
""", "p.yaml")


def test_top_k_prefers_distinct_upstreams_then_quality():
    p = policy("    strategy: fusion\n    fusion: {panel: [a, a2, b], top_k: 2}")
    pred = Prediction(quality={"a": 0.9, "a2": 0.8, "b": 0.5})
    steps, _ = compose.fusion_steps(p.routes[0].fusion, p, {"messages": []}, pred, lambda m: None, 100)
    assert [s.model for s in steps] == ["a", "b"]  # a2 is a's upstream again: b adds an opinion
    steps, left_out = compose.fusion_steps(p.routes[0].fusion, p, {"messages": []}, pred,
                                           lambda m: "circuit open" if m == "a" else None, 100)
    assert [s.model for s in steps] == ["a2", "b"] and left_out == ["a (circuit open)"]


def test_layers_and_samples_make_the_dag():
    p = policy("    strategy: fusion\n    fusion: {panel: [a, b], samples: 2, layers: 2}")
    plan = decide({"model": "concilium/auto", "messages": [{"role": "user", "content": "hi"}]}, p)
    ids = [(s.id, s.model, s.seed, s.after) for s in plan.steps]
    assert ids[:4] == [("p1", "a", 1, []), ("p2", "a", 2, []), ("p3", "b", 1, []), ("p4", "b", 2, [])]
    assert ids[4][0] == "l2.p1" and ids[4][3] == ["p1", "p2", "p3", "p4"]
    assert (plan.steps[-1].id, plan.steps[-1].after) == ("synth", ["l2.p1", "l2.p2", "l2.p3", "l2.p4"])


@pytest.mark.parametrize("text,parts", [
    ("Two things:\n1. reverse a list in Python\n2. integrate x^2", ["Two things:\nreverse a list in Python",
                                                                 "Two things:\nintegrate x^2"]),
    ("- first bullet\n- second bullet\n- third", ["first bullet", "second bullet", "third"]),
    ("What is the capital of Peru? And how tall is its highest mountain?",
     ["What is the capital of Peru?", "And how tall is its highest mountain?"]),
    ("Just one thing to do here.", ["Just one thing to do here."]),
])
def test_the_rules_planner_splits_parts(text, parts):
    assert [p["task"] for p in compose.rules_plan(text)] == parts


def test_a_model_plan_is_checked():
    chain = Chain(max_steps=3, max_depth=2)
    ok = compose.parse_plan("```json\n" + json.dumps({"steps": [
        {"id": "a", "task": "x", "category": "math"}, {"id": "b", "task": "y", "after": ["a"],
                                                       "category": "astrology"}]}) + "\n```", chain)
    assert [(s["id"], s["category"], s["after"]) for s in ok] == [("a", "math", []), ("b", None, ["a"])]
    deep = {"steps": [{"id": "a", "task": "x"}, {"id": "b", "task": "y", "after": ["a"]},
                      {"id": "c", "task": "z", "after": ["b"]}]}
    for bad, why in [("nope", "not JSON"), (json.dumps({"steps": []}), "at least one step"),
                     (json.dumps(deep), "3 steps deep, more than max_depth (2)"),
                     (json.dumps({"steps": [{"task": "x", "tool": 1}]}), "unknown keys"),
                     (json.dumps({"steps": [{"id": "s1", "task": "x"}, {"id": "s1", "task": "y"}]}), "used twice")]:
        with pytest.raises(compose.PlanError, match=re.escape(why)):
            compose.parse_plan(bad, chain)


def test_specialists_by_category_then_default_then_the_first_target():
    chain = Chain(specialists={"code": "a", "default": "b"})
    assert compose.specialist(chain, "code", "s", lambda m: None)[0] == "a"
    assert compose.specialist(chain, "math", "s", lambda m: None)[0] == "b"
    assert compose.specialist(chain, "code", "s", lambda m: "open" if m == "a" else None)[0] == "b"
    assert compose.specialist(Chain(), "code", "s", lambda m: None)[0] == "s"


def test_a_pii_prompt_never_reaches_a_panelist_the_policy_keeps_it_from():
    extra = "privacy: {on_pii: {allow_tags: [private]}}"
    p = policy("    strategy: fusion\n    fusion: {panel: [a, b]}", extra)
    plan = decide({"model": "concilium/auto", "messages": [{"role": "user", "content": "hi"}]}, p, pii=True)
    assert plan.strategy == "fusion"
    kept = restrict(plan, p, True)
    assert kept.strategy == "single" and kept.steps == [] and [c.model for c in kept.candidates] == ["s"]
    assert any("a step's model may not see this prompt" in r for r in kept.reasons)
    p2 = policy("    strategy: fusion\n    fusion: {panel: [a]}", extra)  # every panelist allowed: kept
    plan2 = decide({"model": "concilium/auto", "messages": [{"role": "user", "content": "hi"}]}, p2, pii=True)
    assert restrict(plan2, p2, True).strategy == "fusion"
