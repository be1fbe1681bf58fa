"""The online learner's arithmetic, its exploration, and the off-policy estimators, without a gateway."""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest

from concilium.core.plan import Prediction
from concilium.pipeline.learning import _RedisStore, _Store
from concilium.router.online import Learner, Logged, context, dr, explore, interval, ips, propensity
from tests.guard.support import RedisServer

MATHY = Prediction(category_probs={"math": 0.9, "code": 0.1}, difficulty=0.6)
CODEY = Prediction(category_probs={"code": 0.95, "math": 0.05}, difficulty=0.4)


def test_without_evidence_it_ranks_as_the_trained_router():
    learner = Learner()
    q = {"a": 0.7, "b": 0.6, "c": 0.4}
    adj = learner.adjusted(q, context(MATHY))
    assert sorted(adj, key=adj.get, reverse=True) == ["a", "b", "c"]
    assert adj["a"] - q["a"] == pytest.approx(adj["b"] - q["b"])  # the same optimism for all


def test_evidence_moves_the_estimate_where_the_feedback_points_and_nowhere_else():
    learner = Learner(bonus=0.0)
    x_math, x_code = context(MATHY), context(CODEY)
    for _ in range(30):
        learner.add("a", x_math, 0.0, 0.7)  # a fails on math
        learner.add("a", x_code, 0.9, 0.7)  # and does better than predicted on code
    assert learner.estimate("a", 0.7, x_math) < 0.25
    assert learner.estimate("a", 0.7, x_code) > 0.8
    assert learner.estimate("b", 0.6, x_math) == pytest.approx(0.6)  # b has no evidence
    assert learner.events("a") == 60


def test_a_model_the_trained_router_never_saw_gets_more_optimism_and_learns_faster():
    learner = Learner(ridge=4.0, bonus=0.3, ridge_unknown=1.0)
    x = context(MATHY)
    q = {"known": 0.5, "new": 0.5}
    adj = learner.adjusted(q, x, unknown={"new"})
    assert adj["new"] > adj["known"]
    for m in q:
        for _ in range(3):
            learner.add(m, x, 0.9, 0.5)
    assert learner.estimate("new", 0.5, x, optimistic=False, unknown=True) > \
        learner.estimate("known", 0.5, x, optimistic=False) + 0.05


def test_the_optimism_bonus_shrinks_with_evidence():
    learner = Learner(bonus=0.5)
    x = context(MATHY)
    before = learner.estimate("a", 0.5, x) - learner.estimate("a", 0.5, x, optimistic=False)
    for _ in range(50):
        learner.add("a", x, 0.5, 0.5)
    after = learner.estimate("a", 0.5, x) - learner.estimate("a", 0.5, x, optimistic=False)
    assert after < before / 3


def test_exploration_draws_with_the_propensities_it_reports():
    rng = random.Random(7)
    order = ["a", "b", "c", "d"]
    counts = {m: 0 for m in order}
    for _ in range(20_000):
        pick, p, explored = explore(order, "a", 0.2, rng)
        counts[pick] += 1
        assert p == pytest.approx(propensity(pick, "a", 0.2, 4))
        assert explored or pick == "a"
    assert counts["a"] / 20_000 == pytest.approx(0.85, abs=0.01)
    assert counts["c"] / 20_000 == pytest.approx(0.05, abs=0.01)
    assert sum(propensity(m, "a", 0.2, 4) for m in order) == pytest.approx(1.0)


def _logged(n: int, seed: int = 0) -> tuple[list[Logged], dict[str, float]]:
    """A logging router that is greedy for `a` with 30% exploration; `b` is truly better."""
    rng = random.Random(seed)
    truth = {"a": 0.4, "b": 0.7}
    out = []
    for _ in range(n):
        pick, p, _ = explore(["a", "b"], "a", 0.3, rng)
        reward = 1.0 if rng.random() < truth[pick] else 0.0
        out.append(Logged(pick, p, reward, {"a": 0.5, "b": 0.5}, {"logged": "a", "always_b": "b"}))
    return out, truth


@pytest.mark.parametrize("estimator", [ips, dr])
def test_off_policy_estimates_recover_a_router_that_never_routed(estimator):
    events, truth = _logged(6000)
    mean, lo, hi = interval(estimator(events, "always_b"))
    assert lo <= truth["b"] <= hi and hi - lo < 0.12
    mean_a, lo_a, hi_a = interval(estimator(events, "logged"))
    assert lo_a <= truth["a"] <= hi_a
    assert lo > hi_a  # the better router is told apart


def test_a_router_without_support_in_the_log_falls_back_to_the_reward_model():
    events = [Logged("a", 1.0, 1.0, {"a": 0.5, "b": 0.3}, {"other": "b"}) for _ in range(10)]
    assert ips(events, "other").mean() == 0.0  # never agrees: no evidence at all
    assert dr(events, "other").mean() == pytest.approx(0.3)  # the trained router's guess


def _adds(store, n: int) -> None:
    x = context(MATHY)
    for _ in range(n):
        asyncio.run(store.add("a", x, -0.25))


def test_file_store_keeps_the_sums_across_restarts(tmp_path):
    store = _Store(str(tmp_path), 1000)
    _adds(store, 3)
    again = _Store(str(tmp_path), 1000)
    stats = asyncio.run(again.read())["a"]
    x = np.asarray(context(MATHY))
    assert stats.n == 3 and np.allclose(stats.a, 3 * np.outer(x, x))
    assert np.allclose(stats.b, 3 * -0.25 * x)


def test_redis_sums_from_two_clients_are_one(tmp_path):
    srv = RedisServer.start(tmp_path / "redis")
    try:
        async def both() -> object:
            one, two = _RedisStore(srv.url, 1000), _RedisStore(srv.url, 1000)
            x = context(MATHY)
            await asyncio.gather(*(s.add("a", x, 0.1) for s in (one, two) for _ in range(20)))
            stats = (await one.read())["a"]
            await one.close()
            await two.close()
            return stats

        stats = asyncio.run(both())
        x = np.asarray(context(MATHY))
        assert stats.n == 40 and np.allclose(stats.b, 40 * 0.1 * x)
    finally:
        srv.kill()
