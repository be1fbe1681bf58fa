"""The evaluation metrics on constructed cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from concilium.router import metrics as M


def test_constant_router_scores_exactly_half():
    rng = np.random.default_rng(1)
    weak = rng.integers(0, 2, 500).astype(float)
    strong = np.maximum(weak, rng.integers(0, 2, 500))
    assert M.two_model_curve(np.zeros(500), weak, strong).apgr == pytest.approx(0.5, abs=1e-9)


def test_apgr_and_cpt_on_a_hand_computed_case():
    # 4 prompts; only prompt 0 gains from the strong model (weak 0, strong 1).
    weak = np.array([0.0, 1.0, 1.0, 1.0])
    strong = np.array([1.0, 1.0, 1.0, 1.0])
    perfect = M.two_model_curve(np.array([9.0, 1.0, 1.0, 1.0]), weak, strong)
    # PGR at shares 0, .25, .5, .75, 1 = 0, 1, 1, 1, 1 -> trapezoid area 0.875
    assert perfect.apgr == pytest.approx(0.875)
    assert perfect.cpt(0.5) == pytest.approx(0.25)
    worst = M.two_model_curve(np.array([0.0, 1.0, 2.0, 3.0]), weak, strong)
    # PGR = 0, 0, 0, 0, 1 -> area 0.125; PGR 0.8 only reached at 100%
    assert worst.apgr == pytest.approx(0.125)
    assert worst.cpt(0.8) == pytest.approx(1.0)


def test_ties_count_as_their_expected_value():
    weak = np.array([0.0, 1.0])
    strong = np.array([1.0, 1.0])
    tied = M.two_model_curve(np.array([1.0, 1.0]), weak, strong)
    # Halfway the expected PGR is 0.5: curve 0, 0.5, 1 -> area 0.5
    assert tied.pgr.tolist() == pytest.approx([0.0, 0.5, 1.0])
    assert tied.apgr == pytest.approx(0.5)


def test_oracle_beats_one_when_strong_sometimes_loses():
    weak = np.array([1.0, 0.0, 1.0, 0.0])
    strong = np.array([0.0, 1.0, 1.0, 1.0])
    oracle = M.two_model_curve(M.oracle_scores(weak, strong), weak, strong)
    assert oracle.apgr > 1.0
    assert oracle.quality.max() == pytest.approx(1.0)  # more than strong alone (0.75)


def test_equal_models_are_rejected():
    with pytest.raises(ValueError, match="same average quality"):
        M.two_model_curve(np.zeros(2), np.array([1.0, 0.0]), np.array([0.0, 1.0]))


def test_upper_hull_is_monotone_and_convex():
    pts = np.array([[0.0, 0.5], [0.5, 0.6], [0.5, 0.55], [1.0, 1.0], [2.0, 0.9]])
    hull = M.upper_hull(pts)
    # (0.5, 0.6) lies under the chord from (0, .5) to (1, 1); (2, .9) is lower than (1, 1)
    assert hull.tolist() == [[0.0, 0.5], [1.0, 1.0]]


def test_aiq_known_values():
    # A line from (0, .5) to (1, 1) over [0, 1]: area 0.75
    assert M.aiq(np.array([[0.0, 0.5], [1.0, 1.0]]), 0.0, 1.0) == pytest.approx(0.75, abs=1e-4)
    # A single model at cost .5, quality .8: zero below its cost, flat after -> 0.4
    assert M.aiq(np.array([[0.5, 0.8]]), 0.0, 1.0) == pytest.approx(0.4, abs=1e-3)
    # The cheapest model is worth its quality over the whole range
    assert M.aiq(np.array([[0.0, 0.7]]), 0.0, 1.0) == pytest.approx(0.7)


def test_tradeoff_curve_spans_cheap_to_best():
    q = np.array([[0.0, 1.0], [1.0, 1.0]])
    c = np.array([[1.0, 10.0], [1.0, 10.0]])
    pts = M.tradeoff_curve(q, q, c)
    assert pts[:, 0].min() == pytest.approx(1.0)  # high lambda: always the cheap model
    assert pts[:, 1].max() == pytest.approx(1.0)  # lambda 0: the better model where it helps
    oracle = M.oracle_points(q, c)
    # The oracle reaches quality 1 paying for the dear model on one prompt only
    assert any(p[1] == pytest.approx(1.0) and p[0] == pytest.approx(5.5) for p in oracle)
