"""The router that keeps learning: a contextual bandit on top of the trained router's predictions.

For each model m, the learner keeps a ridge regression of the *residual* r - q_m(x): how much better
or worse than the trained router predicted (q_m) the model did on requests like this one, where r is
the feedback score (0..1) and x the request's context:

    x = [1, P(category) for each of the 7 categories, predicted difficulty]        (9 numbers)

Its estimate is q_m + theta_m . x, plus an optimism bonus `bonus * sqrt(x' A_m^-1 x)` that is large
for what it has seen little of (a category it rarely gets; a model the trained router never saw,
whose prediction is only a tier prior and so gets the weaker `ridge_unknown`) and shrinks with
evidence: LinUCB on residuals. With no feedback, theta = 0 and it ranks exactly as the trained
router does, so turning learning on changes nothing until evidence arrives.

The sufficient statistics (sum x x', b_m = sum (r - q_m) x, n_m; A_m adds the ridge) are sums, so
replicas that add to the same Redis hash learn as one (`router/learning_store.py`).

While learning is on, `explore` of the routed requests (never pinned ones, never PII, only routes
whose targets the router ranks) go to a uniformly random candidate, whichever router is live. That
makes every choice's probability (its *propensity*) known and non-zero, which is what lets the
decision log score a router that did not route (`ips`, `dr` below) before it is promoted.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from concilium.core.plan import Prediction
from concilium.policy.schema import CATEGORIES

DIM = len(CATEGORIES) + 2


def context(prediction: Prediction | None) -> list[float]:
    """The request's context vector x (see the module docstring)."""
    if prediction is None:
        return [1.0] + [0.0] * len(CATEGORIES) + [0.5]
    probs = prediction.category_probs
    d = prediction.difficulty if prediction.difficulty is not None else 0.5
    return [1.0] + [round(float(probs.get(c, 0.0)), 4) for c in CATEGORIES] + [round(float(d), 4)]


@dataclass
class ModelStats:
    """The sums for one model: sum x x' (`a`), sum (r - q) x (`b`) and the count `n` (no prior in them:
    the learner adds its ridge when it solves, so the sums stay plain, shareable additions)."""

    a: np.ndarray  # DIM x DIM
    b: np.ndarray  # DIM
    n: float = 0.0

    @classmethod
    def empty(cls) -> ModelStats:
        return cls(np.zeros((DIM, DIM)), np.zeros(DIM), 0.0)

    def solved(self, ridge: float) -> tuple[np.ndarray, np.ndarray]:
        inv = np.linalg.inv(self.a + np.eye(DIM) * ridge)
        return inv @ self.b, inv


class Learner:
    """Estimates per model from sufficient statistics; `stats` maps model -> ModelStats (what the
    store last read, plus local updates not yet read back).

    `ridge` is how many events of evidence the trained router's prediction is worth; for a model
    the trained router has never seen (its prediction is only a tier prior) that is `ridge_unknown`,
    so its correction moves faster and its optimism starts larger."""

    def __init__(self, ridge: float = 4.0, bonus: float = 0.1, ridge_unknown: float = 1.0) -> None:
        self.ridge, self.bonus, self.ridge_unknown = ridge, bonus, ridge_unknown
        self._solved: dict[tuple[str, bool], tuple[np.ndarray, np.ndarray, float]] = {}
        self.stats: dict[str, ModelStats] = {}

    def load(self, stats: dict[str, ModelStats]) -> None:
        """Replace the statistics (from the shared store) and drop the cached solutions."""
        self.stats = stats
        self._solved.clear()

    def _theta(self, model: str, unknown: bool = False) -> tuple[np.ndarray, np.ndarray, float]:
        got = self._solved.get((model, unknown))
        if got is None:
            s = self.stats.get(model) or ModelStats.empty()
            theta, inv = s.solved(self.ridge_unknown if unknown else self.ridge)
            got = self._solved[(model, unknown)] = (theta, inv, s.n)
        return got

    def estimate(self, model: str, q: float, x: Sequence[float], optimistic: bool = True,
                 unknown: bool = False) -> float:
        """The learner's P(answers well) for `model` on a request with context `x`; `q` is the
        trained router's prediction (`unknown`: only a prior, the trained router never saw the model)."""
        theta, inv, _ = self._theta(model, unknown)
        v = np.asarray(x)
        est = q + float(theta @ v)
        if optimistic and self.bonus:
            est += self.bonus * math.sqrt(max(0.0, float(v @ inv @ v)))
        return min(1.0, max(0.0, est))

    def adjusted(self, quality: dict[str, float], x: Sequence[float], optimistic: bool = True,
                 unknown: frozenset[str] | set[str] = frozenset()) -> dict[str, float]:
        return {m: round(self.estimate(m, q, x, optimistic, m in unknown), 4) for m, q in quality.items()}

    def add(self, model: str, x: Sequence[float], reward: float, q: float) -> None:
        """One rewarded decision, locally (the store adds the same to the shared sums)."""
        s = self.stats.get(model) or ModelStats.empty()
        v = np.asarray(x, dtype=np.float64)
        s.a = s.a + np.outer(v, v)
        s.b = s.b + (reward - q) * v
        s.n += 1
        self.stats[model] = s
        self._solved = {k: v for k, v in self._solved.items() if k[0] != model}

    def events(self, model: str) -> float:
        s = self.stats.get(model)
        return s.n if s is not None else 0.0


def explore(order: list[str], greedy: str, share: float, rng: random.Random | None = None) -> tuple[str, float, bool]:
    """With probability `share`, a uniformly random one of `order`; else `greedy`. Returns the
    choice, its probability (propensity) and whether it was the random draw."""
    k = len(order)
    r = (rng or random).random()
    if share > 0 and k > 1 and r < share:
        pick = order[int((rng or random).random() * k) % k]
        return pick, propensity(pick, greedy, share, k), True
    return greedy, propensity(greedy, greedy, share, k), False


def propensity(chosen: str, greedy: str, share: float, k: int) -> float:
    if k <= 1:
        return 1.0
    return (1.0 - share) * (chosen == greedy) + share / k


# ------------------------------------------------------------------------------------ off-policy

@dataclass
class Logged:
    """One rewarded decision from the log: what was chosen with what probability, what it earned,
    the trained router's predictions (the reward model the doubly-robust estimate leans on) and what
    each router under evaluation would have chosen."""

    chosen: str
    propensity: float
    reward: float
    q: dict[str, float]
    choices: dict[str, str]  # router name (static, learner, ...) -> the model it picked


def ips(events: Sequence[Logged], router: str) -> np.ndarray:
    """Per-event inverse-propensity terms for `router`: reward / propensity where it agrees with the
    logged choice, else 0. Their mean is an unbiased estimate of its reward."""
    return np.array([(e.reward / e.propensity) if e.choices.get(router) == e.chosen else 0.0 for e in events])


def dr(events: Sequence[Logged], router: str) -> np.ndarray:
    """Per-event doubly-robust terms: the reward model's guess for the router's pick, corrected by
    the inverse-propensity-weighted error where the router agrees with the logged choice."""
    out = []
    for e in events:
        pick = e.choices.get(router)
        base = e.q.get(pick, 0.0) if pick is not None else 0.0
        if pick == e.chosen:
            base += (e.reward - e.q.get(e.chosen, 0.0)) / e.propensity
        out.append(base)
    return np.array(out)


def interval(terms: np.ndarray, level: float = 0.95, resamples: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean of per-event terms and a bootstrap percentile interval."""
    if len(terms) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(terms), size=(resamples, len(terms)))
    means = terms[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(terms.mean()), float(lo), float(hi)
