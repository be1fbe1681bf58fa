"""Router evaluation metrics: PGR/APGR/CPT for two models, quality-cost curves and AIQ for N.

Two models (weak, strong): a router gives every prompt a score; higher means "send to strong".
Sending the top share s of prompts to the strong model gives quality q(s);
PGR(s) = (q(s) - q_weak) / (q_strong - q_weak); APGR is the mean of PGR over s in [0, 1];
CPT(x) is the smallest share s with PGR(s) >= x. Prompts with equal scores are treated as one
block routed in random order, so ties score their expected value (a constant router gets 0.5).

N models with costs: a router with a knob traces (average cost, average quality) points. Its
curve is the upper convex hull of those points made non-decreasing (spending more never has to
lower quality: one can pay and still use the cheaper choice); AIQ is the area under that curve
over the cost range [cheapest single model, dearest single model], normalised to that range. Below
the router's cheapest point the curve counts as zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class TwoModelCurve:
    share: np.ndarray  # share of prompts sent to the strong model, 0..1
    quality: np.ndarray
    pgr: np.ndarray
    apgr: float
    q_weak: float
    q_strong: float

    def cpt(self, target: float) -> float:
        """Smallest strong share reaching PGR >= target (1.0 if never reached)."""
        hit = np.nonzero(self.pgr >= target - 1e-12)[0]
        return float(self.share[hit[0]]) if hit.size else 1.0


def two_model_curve(router_scores: np.ndarray, weak: np.ndarray, strong: np.ndarray) -> TwoModelCurve:
    s = np.asarray(router_scores, dtype=np.float64)
    w = np.asarray(weak, dtype=np.float64)
    g = np.asarray(strong, dtype=np.float64) - w
    n = len(s)
    if n == 0 or not (len(w) == len(g) == n):
        raise ValueError("router scores, weak and strong outcomes must be non-empty and of equal length")
    order = np.argsort(-s, kind="stable")
    s_sorted, gain = s[order], g[order]
    # Average the gain inside blocks of tied scores (their expected value under random order).
    _, start, counts = np.unique(-s_sorted, return_index=True, return_counts=True)
    block_mean = np.add.reduceat(gain, start) / counts
    gain = np.repeat(block_mean, counts)
    cum = np.concatenate([[0.0], np.cumsum(gain)])
    q_weak, q_strong = float(w.mean()), float(w.mean() + g.mean())
    quality = q_weak + cum / n
    share = np.arange(n + 1) / n
    span = q_strong - q_weak
    if abs(span) < 1e-12:
        raise ValueError("the two models have the same average quality; PGR is undefined")
    pgr = (quality - q_weak) / span
    apgr = float(np.trapezoid(pgr, share))
    return TwoModelCurve(share, quality, pgr, apgr, q_weak, q_strong)


def oracle_scores(weak: np.ndarray, strong: np.ndarray) -> np.ndarray:
    """The best possible two-model router: strong first where it gains, never where it loses."""
    return np.asarray(strong, dtype=np.float64) - np.asarray(weak, dtype=np.float64)


def upper_hull(points: np.ndarray) -> np.ndarray:
    """Non-decreasing upper convex hull of (cost, quality) points, sorted by cost."""
    pts = np.asarray(points, dtype=np.float64)
    pts = pts[np.lexsort((-pts[:, 1], pts[:, 0]))]
    # Keep only points that raise quality as cost grows (monotone part).
    mono = []
    best = -np.inf
    for c, q in pts:
        if q > best + 1e-15:
            mono.append((c, q))
            best = q
    hull: list[tuple[float, float]] = []
    for p in mono:
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            # Drop the middle point when it lies on or below the segment from hull[-2] to p.
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) >= 0:
                hull.pop()
            else:
                break
        hull.append(p)
    return np.array(hull)


def hull_quality_at(hull: np.ndarray, cost: float) -> float:
    """Quality the hull reaches at a budget (0 below its cheapest point, flat past its last)."""
    if cost < hull[0, 0] - 1e-15:
        return 0.0
    if cost >= hull[-1, 0]:
        return float(hull[-1, 1])
    return float(np.interp(cost, hull[:, 0], hull[:, 1]))


def aiq(points: np.ndarray, c_min: float, c_max: float, grid: int = 2001) -> float:
    """Area under the non-decreasing convex hull of `points` over [c_min, c_max], normalised."""
    if c_max <= c_min:
        raise ValueError("AIQ needs c_max > c_min")
    hull = upper_hull(points)
    xs = np.linspace(c_min, c_max, grid)
    ys = np.array([hull_quality_at(hull, x) for x in xs])
    return float(np.trapezoid(ys, xs) / (c_max - c_min))


def choose_tradeoff(quality: np.ndarray, cost: np.ndarray, lam: float) -> np.ndarray:
    """Per prompt, the model maximising quality - lam * cost. quality/cost: (prompts, models)."""
    return np.argmax(quality - lam * cost, axis=1)


def tradeoff_curve(pred_quality: np.ndarray, true_quality: np.ndarray, cost: np.ndarray,
                   lambdas: np.ndarray | None = None) -> np.ndarray:
    """(cost, quality) points of a router choosing by predicted quality - lam * cost, swept over lam."""
    if lambdas is None:
        scale = float(np.median(cost[cost > 0])) if np.any(cost > 0) else 1.0
        lambdas = np.concatenate([[0.0], np.geomspace(1e-3, 1e3, 200) / scale])
    rows = np.arange(len(true_quality))
    pts = []
    for lam in lambdas:
        pick = choose_tradeoff(pred_quality, cost, lam)
        pts.append((cost[rows, pick].mean(), true_quality[rows, pick].mean()))
    return np.array(pts)


def random_mix_points(true_quality: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """Single-model points; their hull is what random mixing of models reaches."""
    return np.stack([cost.mean(0), true_quality.mean(0)], axis=1)


def oracle_points(true_quality: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """The oracle knows each prompt's outcomes: it sweeps the same trade-off on the true quality."""
    return tradeoff_curve(true_quality, true_quality, cost)
