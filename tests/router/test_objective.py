"""Objective math: ranking, thresholds, costs, and the vectorised first choice used by calibrate."""

from __future__ import annotations

import numpy as np
import pytest

from concilium.policy.pricing import estimate_usd as est_cost
from concilium.policy.pricing import prompt_tokens as input_tokens
from concilium.policy.schema import ModelSpec, Objective
from concilium.router.objective import apply_objective, first_choice, requested_output_tokens

ITEMS = [("cheap", 0.60, 0.001), ("mid", 0.80, 0.010), ("best", 0.90, 0.100)]


def order(ranked):
    return [m for m, *_ in ranked]


def test_min_cost_picks_cheapest_above_the_bar():
    ranked, thr, desc = apply_objective(ITEMS, Objective(kind="min_cost", quality_ratio=0.85))
    assert thr == pytest.approx(0.765)  # 0.85 x 0.90
    assert order(ranked) == ["mid", "best", "cheap"]  # eligible by cost, then the rest by quality
    assert "0.85" in desc
    ranked, *_ = apply_objective(ITEMS, Objective(kind="min_cost", quality_ratio=0.5))
    assert order(ranked)[0] == "cheap"
    ranked, *_ = apply_objective(ITEMS, Objective(kind="min_cost", quality_ratio=1.0))
    assert order(ranked)[0] == "best"


def test_max_quality_respects_the_cap():
    ranked, thr, _ = apply_objective(ITEMS, Objective(kind="max_quality", max_cost_usd=0.02))
    assert thr == 0.02
    assert order(ranked) == ["mid", "cheap", "best"]
    assert "over the cost cap" in ranked[-1][3]
    ranked, thr, _ = apply_objective(ITEMS, Objective(kind="max_quality"))
    assert order(ranked)[0] == "best" and thr is None
    # Nothing within the cap: cheapest first
    ranked, *_ = apply_objective(ITEMS, Objective(kind="max_quality", max_cost_usd=0.0001))
    assert order(ranked) == ["cheap", "mid", "best"]


def test_tradeoff_utility():
    # lambda 10/USD: utilities .59, .70, -.10
    ranked, thr, _ = apply_objective(ITEMS, Objective(kind="tradeoff", lambda_per_usd=10))
    assert order(ranked) == ["mid", "cheap", "best"] and thr is None
    ranked, *_ = apply_objective(ITEMS, Objective(kind="tradeoff", lambda_per_usd=0))
    assert order(ranked)[0] == "best"
    ranked, *_ = apply_objective(ITEMS, Objective(kind="tradeoff", lambda_per_usd=1e6))
    assert order(ranked)[0] == "cheap"


def test_cost_estimate():
    spec = ModelSpec(provider="litellm", model="x", price={"input": 2.0, "output": 8.0}, max_output_tokens=100)
    assert est_cost(spec, 1000, 50) == pytest.approx((1000 * 2 + 50 * 8) / 1e6)
    assert est_cost(spec, 1000, 5000) == pytest.approx((1000 * 2 + 100 * 8) / 1e6)  # capped by max_output_tokens
    assert input_tokens(400, 2) == pytest.approx(108)
    assert requested_output_tokens({"max_tokens": 77}) == 77
    assert requested_output_tokens({"max_completion_tokens": 5, "max_tokens": 77}) == 5
    assert requested_output_tokens({"max_tokens": True}) is None


@pytest.mark.parametrize(
    "obj",
    [
        Objective(kind="min_cost", quality_ratio=0.9),
        Objective(kind="min_cost", quality_ratio=0.5),
        Objective(kind="tradeoff", lambda_per_usd=30),
        Objective(kind="max_quality", max_cost_usd=0.01),
        Objective(kind="max_quality"),
    ],
)
def test_first_choice_matches_apply_objective(obj):
    rng = np.random.default_rng(3)
    q = rng.random((200, 4)).round(2)  # rounding makes ties happen
    c = rng.choice([0.001, 0.005, 0.01, 0.02], size=(200, 4))
    picks = first_choice(q, c, obj)
    names = ["a", "b", "c", "d"]
    for i in range(200):
        ranked, *_ = apply_objective(list(zip(names, q[i], c[i], strict=True)), obj)
        assert names[picks[i]] == ranked[0][0]
