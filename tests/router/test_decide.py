"""router.decide: per-model timeouts, context windows, and what a pinned request may fall back to."""

from __future__ import annotations

import pytest

from concilium.policy.loader import PolicyError, parse_policy
from concilium.router.decide import DecisionError, decide

POLICY_TEXT = """
version: 1
models:
  small: {provider: openai, base_url: "http://127.0.0.1:1/v1", model: small, context_window: 1000}
  big: {provider: openai, base_url: "http://127.0.0.1:1/v1", model: big, context_window: 100000}
  quick: {provider: openai, base_url: "http://127.0.0.1:1/v1", model: quick, timeout_s: 1}
  steady: {provider: openai, base_url: "http://127.0.0.1:1/v1", model: steady, fallbacks: [big]}
  capped: {provider: openai, base_url: "http://127.0.0.1:1/v1", model: capped, context_window: 1000,
           max_output_tokens: 100}
routes:
  - name: long
    match: {model: [concilium/long]}
    targets: [small]
    fallbacks: [big]
  - name: tight
    match: {model: [concilium/tight]}
    targets: [quick, steady]
    timeout_s: 5
    retries: 4
  - name: loose
    match: {model: [concilium/loose]}
    targets: [quick]
    fallbacks: [small]
    timeout_s: 0.5
  - name: main
    targets: [steady]
    fallbacks: [small, quick]
    timeout_s: 7
    retries: 5
router:
  virtual_models: [concilium/auto, concilium/long, concilium/tight, concilium/loose]
limits: {default_timeout_s: 30}
retry: {attempts: 2}
"""
POLICY = parse_policy(POLICY_TEXT)


def body(model="concilium/auto", text="hi", **kw):
    return {"model": model, "messages": [{"role": "user", "content": text}], **kw}


def models(plan):
    return [c.model for c in plan.candidates]


# -- item: per-model timeouts ----------------------------------------------------------------------

def test_a_models_timeout_applies_on_routed_calls():
    plan = decide(body("concilium/tight"), POLICY)
    assert models(plan) == ["quick", "steady"]
    assert plan.timeout_s == 5
    assert plan.candidates[0].timeout_s == 1  # the model's own limit is stricter than the route's
    assert plan.candidates[1].timeout_s is None  # no limit of its own: the route's applies


def test_the_stricter_of_route_and_model_timeout_wins():
    plan = decide(body("concilium/loose"), POLICY)
    assert plan.timeout_s == 0.5 and plan.candidates[0].timeout_s == 0.5


def test_a_models_timeout_applies_on_pinned_calls():
    plan = decide(body("quick"), POLICY)
    assert models(plan) == ["quick"] and plan.candidates[0].timeout_s == 1


# -- item: pinned models ---------------------------------------------------------------------------

def test_pinned_model_does_not_inherit_the_first_routes_fallbacks_or_timeouts():
    plan = decide(body("steady"), POLICY)  # `main` lists steady first, with fallbacks and timeout 7
    assert models(plan) == ["steady", "big"]  # only the model's own fallbacks from the policy
    assert plan.timeout_s == 30 and plan.retries == 2  # the policy defaults, not route main's
    plan = decide(body("small"), POLICY)  # route `long` lists small first, with fallbacks [big]
    assert models(plan) == ["small"]


def test_pinned_request_asks_for_fallbacks():
    plan = decide(body("small", fallbacks=["big", "small"]), POLICY)
    assert models(plan) == ["small", "big"]
    plan = decide(body("small", models=["quick", "big"]), POLICY)  # OpenRouter-style
    assert models(plan) == ["small", "quick", "big"]
    assert plan.candidates[1].timeout_s == 1  # each fallback keeps its own timeout
    plan = decide(body("concilium/long", fallbacks=["quick"]), POLICY)  # routed: after the route's own
    assert models(plan) == ["small", "big", "quick"]


@pytest.mark.parametrize("field,value,words", [
    ("fallbacks", ["gpt-9"], "gpt-9"),
    ("models", ["concilium/auto"], "concilium/auto"),
    ("fallbacks", "big", "list"),
    ("models", [3], "list"),
])
def test_request_fallbacks_must_name_models(field, value, words):
    with pytest.raises(DecisionError) as e:
        decide(body("small", **{field: value}), POLICY)
    assert e.value.status in (400, 404) and e.value.param == field and words in e.value.message


def test_policy_model_fallbacks_must_exist():
    with pytest.raises(PolicyError) as e:
        parse_policy(POLICY_TEXT.replace("fallbacks: [big]}", "fallbacks: [nope]}"))
    assert "models.steady.fallbacks" in str(e.value) and "nope" in str(e.value)


# -- item: context windows -------------------------------------------------------------------------

def test_plan_skips_models_whose_window_cannot_hold_the_prompt():
    plan = decide(body("concilium/long", text="word " * 1000), POLICY)  # ~1250 tokens > 1000
    assert models(plan) == ["big"]
    assert plan.skipped[0].model == "small" and "context window 1000" in plan.skipped[0].reason
    assert plan.reasons[0] == "chose big"


def test_max_tokens_counts_against_the_window():
    assert models(decide(body("concilium/long", text="word " * 400), POLICY)) == ["small", "big"]
    plan = decide(body("concilium/long", text="word " * 400, max_tokens=800), POLICY)
    assert models(plan) == ["big"] and "800" in plan.skipped[0].reason


def test_a_models_max_output_tokens_bounds_what_it_needs_of_the_window():
    plan = decide(body("capped", text="word " * 400, max_tokens=800), POLICY)  # writes at most 100
    assert models(plan) == ["capped"]
    with pytest.raises(DecisionError) as e:
        decide(body("capped", text="word " * 760, max_tokens=800), POLICY)  # ~954 + 100 > 1000
    assert e.value.code == "context_length_exceeded" and "max_tokens 100" in e.value.message


def test_prompt_no_model_can_hold_is_context_length_exceeded():
    with pytest.raises(DecisionError) as e:
        decide(body("concilium/long", text="x" * 500_000), POLICY)
    assert e.value.status == 400 and e.value.code == "context_length_exceeded"
    assert "small" in e.value.message and "big" in e.value.message
    with pytest.raises(DecisionError) as e:  # pinned: the same answer
        decide(body("small", text="word " * 1000), POLICY)
    assert e.value.code == "context_length_exceeded"


def test_windows_callable_reports_the_real_cap():
    plan = decide(body("concilium/long", text="word " * 400), POLICY,
                  windows=lambda m: 300 if m == "small" else None)
    assert models(plan) == ["big"] and "context window 300" in plan.skipped[0].reason


def test_unavailable_models_that_could_hold_it_are_not_a_context_error():
    plan = decide(body("concilium/long", text="word " * 1000), POLICY,
                  availability=lambda m: "KEY is not set" if m == "big" else None)
    assert plan.candidates == [] and {s.model for s in plan.skipped} == {"small", "big"}
