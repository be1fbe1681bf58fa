"""`concilium router calibrate`: pick the objective's knob so that a target share of traffic goes to
a model or a tier, on a reference prompt set (RouteLLM's threshold calibration, for N models).

The knob is the one the policy's objective uses: `quality_ratio` (min_cost), `lambda_per_usd`
(tradeoff) or `max_cost_usd` (max_quality). Every prompt is predicted once; the first choice is
then recomputed for each knob value on a grid (vectorised, the same rule as `objective.py`), and
the value whose share is closest to the target wins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from concilium.policy.pricing import estimate_usd, prompt_tokens
from concilium.policy.schema import Objective, Policy
from concilium.router.learned import Dispatcher
from concilium.router.objective import first_choice, requested_output_tokens
from concilium.router.priors import prior_quality, tier_of
from concilium.router.text import prompt_chars, request_text

KNOB = {"min_cost": "quality_ratio", "tradeoff": "lambda_per_usd", "max_quality": "max_cost_usd"}


class CalibrationError(ValueError):
    pass


@dataclass
class Calibration:
    kind: str
    knob: str
    value: float
    share: float  # achieved share on the reference set
    target_share: float
    target: list[str]  # the models counted as the target
    shares: dict[str, float]  # first-choice share of every candidate at `value`
    n_prompts: int
    curve: list[tuple[float, float]]  # (knob value, share) over the grid

    def yaml(self) -> str:
        v = f"{self.value:.6g}"
        return f"router:\n  objective:\n    kind: {self.kind}\n    {self.knob}: {v}\n"


def prediction_matrix(
    dispatcher: Dispatcher, bodies: list[dict[str, Any]], policy: Policy, candidates: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """(quality, cost) matrices of shape (prompts, candidates), batched."""
    texts, turns = zip(*(request_text(b) for b in bodies), strict=True)
    pred = dispatcher.predictor
    x = pred.features_batch(list(texts), [max(t, 1) for t in turns])
    q_art, cat, dif = pred.forward_batch(x)
    difficulty = dif @ np.array([0.0, 0.5, 1.0])
    out_tok = cat @ dispatcher._out_tokens
    mapping = dispatcher.model_map(policy)
    cats = dispatcher.artifact.categories
    n, c = len(bodies), len(candidates)
    quality, cost = np.zeros((n, c)), np.zeros((n, c))
    for i, body in enumerate(bodies):
        probs = dict(zip(cats, cat[i].tolist(), strict=True))
        msgs = body.get("messages")
        n_in = prompt_tokens(prompt_chars(body), len(msgs) if isinstance(msgs, list) else 1)
        req = requested_output_tokens(body)
        n_out = float(req) if req is not None else float(out_tok[i])
        for j, name in enumerate(candidates):
            spec = policy.models[name]
            idx = mapping.get(name)
            quality[i, j] = q_art[i, idx] if idx is not None else prior_quality(spec, probs, float(difficulty[i]))
            cost[i, j] = estimate_usd(spec, n_in, n_out)
    return quality, cost


def _grid(kind: str, cost: np.ndarray) -> np.ndarray:
    if kind == "min_cost":
        return np.linspace(0.0, 1.0, 1001)
    if kind == "tradeoff":
        pos = cost[cost > 0]
        scale = float(np.median(pos)) if pos.size else 1e-4
        return np.concatenate([[0.0], np.geomspace(1e-4, 1e4, 801) / scale])
    uniq = np.unique(cost)
    return np.unique(np.concatenate([[0.0], uniq, uniq * (1 + 1e-9)]))


def calibrate(
    dispatcher: Dispatcher,
    policy: Policy,
    bodies: list[dict[str, Any]],
    candidates: list[str],
    target: str,
    share: float,
    kind: str | None = None,
) -> Calibration:
    """`target`: a model name, or `tier:<small|medium|large|frontier>`."""
    if not 0.0 <= share <= 1.0:
        raise CalibrationError("the target share must be between 0 and 1")
    if not bodies:
        raise CalibrationError("the reference prompt set is empty")
    unknown = [m for m in candidates if m not in policy.models]
    if unknown:
        raise CalibrationError(f"unknown models: {', '.join(unknown)}")
    if target.startswith("tier:"):
        tier = target.split(":", 1)[1]
        chosen = [m for m in candidates if tier_of(policy.models[m]) == tier]
    else:
        chosen = [target] if target in candidates else []
    if not chosen:
        raise CalibrationError(f"no candidate matches the target {target!r}; candidates: {', '.join(candidates)}")
    kind = kind or policy.router.objective.kind
    if kind not in KNOB:
        raise CalibrationError(f"unknown objective kind {kind!r}")
    quality, cost = prediction_matrix(dispatcher, bodies, policy, candidates)
    in_target = np.array([m in chosen for m in candidates])
    base = policy.router.objective.model_dump()
    curve = []
    for v in _grid(kind, cost):
        obj = Objective(**{**base, "kind": kind, KNOB[kind]: float(v)})
        picks = first_choice(quality, cost, obj)
        curve.append((float(v), float(in_target[picks].mean())))
    errs = np.array([abs(s - share) for _, s in curve])
    best = int(np.argmin(errs))  # the first (smallest knob) value among the closest
    value, achieved = curve[best]
    obj = Objective(**{**base, "kind": kind, KNOB[kind]: value})
    picks = first_choice(quality, cost, obj)
    shares = {m: float((picks == j).mean()) for j, m in enumerate(candidates)}
    return Calibration(kind, KNOB[kind], value, achieved, share, chosen, shares, len(bodies), curve)
