"""The dispatcher as the gateway uses it: load_dispatcher, predict, rank, priors, decide()."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import pytest

from concilium.policy.schema import Policy
from concilium.router.decide import decide
from concilium.router.learned import DEFAULT_ARTIFACT, Dispatcher, load_dispatcher
from concilium.router.priors import prior_quality, tier_of


def policy(artifact: str | None = None, objective: dict | None = None, learned: bool = True) -> Policy:
    up = {"provider": "openai", "base_url": "https://up.example/v1"}
    return Policy.model_validate({
        "models": {
            "cheap": {**up, "model": "vendor/weak-7b", "price": {"input": 0.2, "output": 0.2}},
            "dear": {**up, "model": "dear-model", "options": {"router_model": "strong"},
                     "price": {"input": 5, "output": 15}},
            "coder": {**up, "model": "my-coder", "tier": "medium", "tags": ["code"], "price": {"input": 1, "output": 3}},
            "writer": {**up, "model": "my-writer", "tier": "medium", "price": {"input": 1, "output": 3}},
            "tiny": {"provider": "local", "model": "smollm2", "tags": ["local"]},
            "big": {**up, "model": "big", "tier": "frontier", "price": {"input": 5, "output": 15}},
        },
        "routes": [{"name": "auto", "targets": ["cheap", "dear", "coder", "writer", "tiny", "big"]}],
        "router": {"artifact": artifact, "learned": learned, "objective": objective or {"kind": "min_cost"}},
    })


def body(text: str, **kw) -> dict:
    return {"model": "concilium/auto", "messages": [{"role": "user", "content": text}], **kw}


@pytest.fixture
def small(small_artifact) -> tuple[Dispatcher, Policy]:
    pol = policy(str(small_artifact))
    d = load_dispatcher(pol.router, pol)
    assert d is not None
    return d, pol


def test_default_artifact_loads_and_predicts_for_every_model():
    pol = policy()
    d = load_dispatcher(pol.router, pol)
    assert d is not None and d.source == str(DEFAULT_ARTIFACT)
    size = sum(p.stat().st_size for p in DEFAULT_ARTIFACT.iterdir())
    assert size < 8 * 1024 * 1024  # shipped in the repository: small
    p = d.predict(body("Write a Python function that merges two sorted lists."), pol)
    assert set(p.quality) == set(pol.models)
    assert all(0 < q < 1 for q in p.quality.values())
    assert p.category == "code" and abs(sum(p.category_probs.values()) - 1) < 1e-3
    assert 0 <= p.difficulty <= 1 and p.difficulty_label in ("easy", "medium", "hard")
    assert p.output_tokens and p.output_tokens > 0


def test_models_are_matched_by_name_option_or_upstream_id(small):
    d, pol = small
    m = d.model_map(pol)
    assert m["cheap"] == 0  # spec.model "vendor/weak-7b" is an alias of "weak"
    assert m["dear"] == 1  # options.router_model: strong
    assert m["coder"] is None and m["tiny"] is None  # no data: priors


def test_learned_quality_follows_the_prompt(small):
    d, pol = small
    chat = d.predict(body("hi Bo, how are you today?"), pol)
    hard = d.predict(body("Ana has 12 coins. Then Ana gets 40 more and gives away 20. Then Ana gets 8 more and "
                          "gives away 4. Then Ana gets 30 more and gives away 15. How many are left in total?"), pol)
    assert chat.quality["cheap"] > 0.7
    assert hard.quality["cheap"] < chat.quality["cheap"] - 0.3
    assert hard.quality["dear"] > 0.8


def test_priors_use_tags_tier_and_difficulty():
    pol = policy()
    code = {"code": 0.9, "chat": 0.1}
    chat = {"chat": 1.0}
    assert prior_quality(pol.models["coder"], code, 0.5) > prior_quality(pol.models["writer"], code, 0.5)
    assert prior_quality(pol.models["coder"], chat, 0.5) == pytest.approx(prior_quality(pol.models["writer"], chat, 0.5))
    tiny, big = pol.models["tiny"], pol.models["big"]
    assert tier_of(tiny) == "small" and tier_of(big) == "frontier"
    gap_easy = prior_quality(big, chat, 0.1) - prior_quality(tiny, chat, 0.1)
    gap_hard = prior_quality(big, chat, 0.95) - prior_quality(tiny, chat, 0.95)
    assert gap_hard > gap_easy > 0  # small/local models lose more on hard prompts
    assert tier_of(pol.models["cheap"]) == "small"  # from its price: $0.2/M out
    assert tier_of(pol.models["dear"]) == "large"  # $15/M out


def test_rank_orders_by_objective_with_costs(small):
    d, _ = small
    pol = policy(str(d.source), {"kind": "min_cost", "quality_ratio": 0.6})
    b = body("hi Chen, how are you today?", max_tokens=100)
    pred = d.predict(b, pol)
    assert pred.quality["cheap"] > 0.6 * pred.quality["dear"]  # the weak model answers chat
    ranked, thr, desc = d.rank(["dear", "cheap"], pred, pol, b)
    assert [r[0] for r in ranked] == ["cheap", "dear"]  # good enough and cheaper
    (_, q, cost, why), _ = ranked
    n_in = len("hi Chen, how are you today?") / 4 + 4
    assert cost == pytest.approx((n_in * 0.2 + 100 * 0.2) / 1e6)  # max_tokens sets the output estimate
    assert q == pred.quality["cheap"] and thr == pytest.approx(0.6 * max(pred.quality["cheap"], pred.quality["dear"]))
    assert "min_cost" in desc and why
    pol_q = policy(str(d.source), {"kind": "max_quality"})
    ranked, thr, desc = d.rank(["cheap", "dear"], d.predict(b, pol_q), pol_q, b)
    assert ranked[0][0] == max(["cheap", "dear"], key=lambda m: pred.quality[m]) and thr is None
    # no max_tokens: the predicted answer length is used
    ranked, *_ = d.rank(["cheap"], pred, pol, body("hi Chen, how are you today?"))
    assert ranked[0][2] == pytest.approx((n_in * 0.2 + pred.output_tokens * 0.2) / 1e6)


def test_decide_puts_prediction_and_ranking_in_the_plan(small):
    d, pol = small
    plan = decide(body("Write a Go function to reverse a linked list, with tests."), pol, dispatcher=d)
    assert plan.prediction is not None and plan.prediction.category == "code"
    assert plan.objective and plan.objective.startswith("min_cost") and plan.threshold is not None
    assert len(plan.candidates) == len(pol.models)
    assert all(c.predicted_quality is not None and c.est_cost_usd is not None for c in plan.candidates)
    assert plan.candidates[0].model != "cheap"  # the weak model fails code requests in this data


def test_off_or_broken_artifacts_give_none(tmp_path, caplog):
    pol = policy(learned=False)
    assert load_dispatcher(pol.router, pol) is None
    caplog.set_level(logging.INFO, logger="concilium.router.learned")
    pol = policy(str(tmp_path / "missing"))
    assert load_dispatcher(pol.router, pol) is None
    assert "not a router artifact" in caplog.text


def test_concurrent_predictions_match_sequential(small):
    d, pol = small
    texts = [f"Fay has {i} apples. Then Fay gets {i + 3} more and gives away 1. How many are left in total?"
             for i in range(40)] + [f"hey Gus #{i}, can we chat for a bit?" for i in range(40)]
    expected = [d.predict(body(t), pol).model_dump() for t in texts]
    with ThreadPoolExecutor(8) as ex:
        got = list(ex.map(lambda t: d.predict(body(t), pol).model_dump(), texts * 3))
    assert got == expected * 3
