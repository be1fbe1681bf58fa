"""Turn predicted quality and prices into the order in which to try models.

- max_quality: the highest predicted quality whose estimated cost is within `max_cost_usd`;
  models over the cap follow, cheapest first.
- min_cost: the cheapest model whose predicted quality is >= `quality_ratio` x the best
  candidate's; models below that bar follow, best first.
- tradeoff: the highest utility = quality - `lambda_per_usd` x cost (willingness to pay per
  quality point).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from concilium.policy.schema import Objective


def requested_output_tokens(body: dict[str, Any]) -> int | None:
    for key in ("max_completion_tokens", "max_tokens"):
        v = body.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


Ranked = list[tuple[str, float, float, str]]


def apply_objective(
    items: list[tuple[str, float, float]], obj: Objective
) -> tuple[Ranked, float | None, str]:
    """items: (model, predicted quality, est cost). Returns (ranked with reasons, threshold, description)."""
    if not items:
        return [], None, obj.kind
    if obj.kind == "max_quality":
        cap = obj.max_cost_usd
        within = [it for it in items if cap is None or it[2] <= cap]
        over = [it for it in items if cap is not None and it[2] > cap]
        within.sort(key=lambda it: (-it[1], it[2]))
        over.sort(key=lambda it: (it[2], -it[1]))
        ranked = [(m, q, c, f"highest predicted quality {q:.2f} within cap") for m, q, c in within]
        ranked += [(m, q, c, f"over the cost cap (${c:.6f})") for m, q, c in over]
        desc = "max_quality" + (f": best predicted quality with est. cost <= ${cap:g}" if cap is not None else "")
        return ranked, cap, desc
    if obj.kind == "min_cost":
        best = max(q for _, q, _ in items)
        bar = obj.quality_ratio * best
        ok = sorted((it for it in items if it[1] >= bar - 1e-12), key=lambda it: (it[2], -it[1]))
        low = sorted((it for it in items if it[1] < bar - 1e-12), key=lambda it: (-it[1], it[2]))
        ranked = [(m, q, c, f"cheapest with quality {q:.2f} >= {bar:.2f}") for m, q, c in ok]
        ranked += [(m, q, c, f"quality {q:.2f} below {bar:.2f}") for m, q, c in low]
        desc = f"min_cost: cheapest with predicted quality >= {obj.quality_ratio:g} x best ({bar:.2f})"
        return ranked, bar, desc
    lam = obj.lambda_per_usd
    scored = sorted(items, key=lambda it: (-(it[1] - lam * it[2]), it[2]))
    ranked = [(m, q, c, f"utility {q - lam * c:.3f} = quality - {lam:g}/USD x cost") for m, q, c in scored]
    return ranked, None, f"tradeoff: maximise quality - {lam:g} x cost (USD)"


def _argbest(primary: np.ndarray, secondary: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per row, the index maximising `primary` then `secondary` among `mask` columns."""
    p = np.where(mask, primary, -np.inf)
    top = p.max(axis=1, keepdims=True)
    tied = mask & (p >= top)
    return np.where(tied, secondary, -np.inf).argmax(axis=1)


def first_choice(quality: np.ndarray, cost: np.ndarray, obj: Objective) -> np.ndarray:
    """Vectorised `apply_objective(...)[0][0]`: the first model tried, per row of (n, c) matrices."""
    every = np.ones_like(quality, dtype=bool)
    if obj.kind == "max_quality":
        cap = np.inf if obj.max_cost_usd is None else obj.max_cost_usd
        within = cost <= cap
        best_within = _argbest(quality, -cost, within)
        cheapest = _argbest(-cost, quality, every)
        return np.where(within.any(axis=1), best_within, cheapest)
    if obj.kind == "min_cost":
        bar = obj.quality_ratio * quality.max(axis=1, keepdims=True)
        return _argbest(-cost, quality, quality >= bar - 1e-12)
    return _argbest(quality - obj.lambda_per_usd * cost, -cost, every)
