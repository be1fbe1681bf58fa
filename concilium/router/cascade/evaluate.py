"""Offline cascade evaluation from outcome records that carry `responses`.

A two-model cascade answers every prompt with the draft (weak) model, scores the draft, and
escalates to the strong model when the score is below the threshold. Sweeping the threshold from
"accept everything" to "escalate everything" traces quality against the escalated share, exactly
like a two-model router's curve (`router.metrics.two_model_curve`), so APGR / CPT(50%) / CPT(80%)
read the same: the x-axis is the share of prompts that also pay for the strong model.

Cost-aware APGR puts money on the x-axis instead: the cascade pays the draft on every prompt and
the strong model on escalated ones; the prompt-only router pays one model per prompt. Cost is
normalised so that 0 = the weak model alone and 1 = the strong model alone; PGR is integrated over
[0, 1] along the best PGR reachable within each budget (a router can always spend less than its
budget; between two operating points it can mix them). A cascade that escalates everything costs
more than the strong model alone and never reaches cost 1 with PGR 1.

`kfold` is the honest protocol: every trained scorer (the verifier, the prompt-only router) is
fitted on k-1 folds and scores the held-out fold only; folds are drawn per seed. Rows:

- `random`: escalation in random order (expected value);
- `prompt router`: the router's training pipeline (static embedding + lexical features, one
  logistic head per model) fitted on the fold's training prompts, escalating by
  P(strong good | prompt) - P(weak good | prompt) — routing without reading the draft;
- `rules`: `RulesVerifier`, no training;
- `verifier`: the trained `Verifier`, escalating the lowest P(draft good) first;
- `verifier + router`: escalating by P(strong good | prompt) - P(draft good | prompt, draft);
- `perfect verifier`: knows whether each draft is right (escalates exactly the wrong ones first);
- `oracle`: knows both outcomes (escalates where the strong model gains first).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from concilium.router import metrics as M
from concilium.router.cascade.grading import grade
from concilium.router.cascade.verifier import RulesVerifier, VerifierConfig, featurise, fit_features
from concilium.router.converters import CHARS_PER_TOKEN
from concilium.router.outcomes import Outcome, OutcomeError


@dataclass
class CascadeData:
    """Records restricted to those with the draft's response and both models' outcomes."""

    draft: str
    strong: str
    records: list[Outcome]
    prompts: list[str]
    answers: list[str]  # the draft model's recorded responses
    weak: np.ndarray  # draft model's quality per prompt (0..1)
    strong_q: np.ndarray  # strong model's quality per prompt
    cost_weak: np.ndarray  # USD per prompt
    cost_strong: np.ndarray
    grading: str


def call_cost(record: Outcome, model: str, prices: dict[str, tuple[float, float]] | None) -> float:
    """USD of one call: the record's `costs` if it has one for the model, else price x tokens
    (prompt characters / 4 in, the recorded response's `output_tokens` or characters / 4 out)."""
    if model in record.costs:
        return record.costs[model]
    if not prices or model not in prices:
        return 0.0
    p_in, p_out = prices[model]
    n_in = len(record.prompt) / CHARS_PER_TOKEN
    n_out = record.output_tokens.get(model)
    if n_out is None:
        n_out = len(record.responses.get(model, "")) / CHARS_PER_TOKEN
    return (p_in * n_in + p_out * n_out) / 1e6


def cascade_data(records: Sequence[Outcome], draft: str, strong: str, grading: str = "scores",
                 prices: dict[str, tuple[float, float]] | None = None) -> CascadeData:
    """`grading`: "scores" (the records' own scores), or "routellm" / "numeric" (re-graded from the
    responses against each record's `reference`)."""
    keep = []
    for r in records:
        if draft not in r.responses:
            continue
        if grading == "scores":
            if draft in r.scores and strong in r.scores:
                keep.append(r)
        elif r.reference is not None and draft in r.responses and strong in r.responses:
            keep.append(r)
    if len(keep) < 10:
        raise OutcomeError(f"need at least 10 records with {draft!r}'s response and outcomes of {draft!r} and "
                           f"{strong!r}" + ("" if grading == "scores" else " (responses + reference for re-grading)")
                           + f"; got {len(keep)}")

    def q(r: Outcome, m: str) -> float:
        return r.scores[m] if grading == "scores" else grade(r.responses[m], r.reference or "", grading)

    return CascadeData(
        draft, strong, keep, [r.prompt for r in keep], [r.responses[draft] for r in keep],
        np.array([q(r, draft) for r in keep]), np.array([q(r, strong) for r in keep]),
        np.array([call_cost(r, draft, prices) for r in keep]), np.array([call_cost(r, strong, prices) for r in keep]),
        grading,
    )


def cost_points(escalate: np.ndarray, weak: np.ndarray, strong: np.ndarray, cost_weak: np.ndarray,
                cost_strong: np.ndarray, cascade: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(normalised cost, PGR) as prompts are escalated in order of decreasing `escalate` score.

    Ties are escalated as a block at their mean (the same rule as `metrics.two_model_curve`)."""
    order = np.argsort(-np.asarray(escalate, np.float64), kind="stable")
    s = np.asarray(escalate, np.float64)[order]
    gain = (strong - weak)[order]
    extra = (cost_strong if cascade else cost_strong - cost_weak)[order]
    _, start, counts = np.unique(-s, return_index=True, return_counts=True)
    gain = np.repeat(np.add.reduceat(gain, start) / counts, counts)
    extra = np.repeat(np.add.reduceat(extra, start) / counts, counts)
    n = len(weak)
    span_q = strong.mean() - weak.mean()
    span_c = cost_strong.mean() - cost_weak.mean()
    if abs(span_q) < 1e-12 or span_c <= 0:
        raise ValueError("cost-aware APGR needs a strong model that is better and dearer than the weak one")
    pgr = np.concatenate([[0.0], np.cumsum(gain)]) / n / span_q
    cost = np.concatenate([[0.0], np.cumsum(extra)]) / n / span_c
    return cost, pgr


def cost_apgr(cost: np.ndarray, pgr: np.ndarray, grid: int = 2001) -> float:
    """Area under the best PGR reachable within each normalised budget in [0, 1]."""
    best = np.maximum.accumulate(pgr)
    xs = np.linspace(0.0, 1.0, grid)
    ys = np.interp(xs, cost, best, right=best[cost <= 1.0 + 1e-12].max() if (cost <= 1.0 + 1e-12).any() else 0.0)
    ys[xs > cost.max()] = best.max()
    return float(np.trapezoid(ys, xs))


def row_metrics(escalate: np.ndarray, data: CascadeData, idx: np.ndarray | None = None, cascade: bool = True) -> dict:
    i = np.arange(len(data.weak)) if idx is None else idx
    w, s = data.weak[i], data.strong_q[i]
    curve = M.two_model_curve(escalate, w, s)
    out = {"apgr": curve.apgr, "cpt50": curve.cpt(0.5), "cpt80": curve.cpt(0.8)}
    if data.cost_strong[i].mean() > data.cost_weak[i].mean():
        c, p = cost_points(escalate, w, s, data.cost_weak[i], data.cost_strong[i], cascade)
        out["cost_apgr"] = cost_apgr(c, p)
    return out


def folds(n: int, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    order = np.random.default_rng(seed).permutation(n)
    parts = np.array_split(order, k)
    return [(np.sort(np.concatenate(parts[:j] + parts[j + 1:])), np.sort(parts[j])) for j in range(k)]


def prompt_router_scores(x: np.ndarray, tr: np.ndarray, te: np.ndarray, targets: Sequence[np.ndarray],
                         c: float = 0.001, lexical_scale: float = 3.0) -> list[np.ndarray]:
    """P(good | prompt) per target on the test rows, fitted on the train rows the way
    `router.train` fits its quality heads (standardised features, lexical block up-weighted)."""
    from concilium.router.features import N_FEATURES
    from concilium.router.train import fit_quality_head

    mu, sd = x[tr].mean(0), x[tr].std(0) + 1e-6
    sd[-N_FEATURES:] /= lexical_scale
    z = (x - mu) / sd
    out = []
    for y in targets:
        coef, b = fit_quality_head(z[tr], y[tr], np.ones(len(tr)), c, 3000)
        out.append(1.0 / (1.0 + np.exp(-(z[te] @ coef + b))))
    return out


@dataclass
class KFoldResult:
    rows: dict[str, dict[str, list[float]]]  # row -> metric -> per-fold values
    n: int
    folds: int
    seeds: int
    oof: dict[str, np.ndarray]  # row -> out-of-fold escalation score (seed 0), for curves

    def summary(self) -> dict[str, dict[str, float]]:
        return {row: {**{m: float(np.mean(v)) for m, v in ms.items()},
                      **{f"{m}_std": float(np.std(v)) for m, v in ms.items()}}
                for row, ms in self.rows.items()}


def kfold(data: CascadeData, config: VerifierConfig | None = None, embedder=None, k: int = 5,
          seeds: Sequence[int] = (0, 1, 2), prompt_features: np.ndarray | None = None,
          verifier_features: np.ndarray | None = None,
          on_fold: Callable[[int, int], None] | None = None) -> KFoldResult:
    """k-fold x seeds evaluation of the cascade rows (see the module docstring)."""
    cfg = config or VerifierConfig()
    n = len(data.weak)
    if verifier_features is None:
        verifier_features = featurise(data.prompts, data.answers, cfg, embedder)
    if prompt_features is None and embedder is not None:
        from concilium.router.features import lexical_matrix

        prompt_features = np.hstack([embedder.encode_batch(data.prompts), lexical_matrix(data.prompts)])
    rules = RulesVerifier()
    rules_accept = np.array([rules.score(p, a) for p, a in zip(data.prompts, data.answers, strict=True)])
    rows: dict[str, dict[str, list[float]]] = {}
    oof: dict[str, np.ndarray] = {}

    def add(name: str, esc: np.ndarray, te: np.ndarray, seed: int, cascade: bool = True) -> None:
        for m, v in row_metrics(esc, data, te, cascade).items():
            rows.setdefault(name, {}).setdefault(m, []).append(v)
        if seed == seeds[0]:
            oof.setdefault(name, np.zeros(n))[te] = esc

    for seed in seeds:
        for j, (tr, te) in enumerate(folds(n, k, seed)):
            add("random", np.zeros(len(te)), te, seed)
            if prompt_features is not None:
                p_w, p_s = prompt_router_scores(prompt_features, tr, te, [data.weak, data.strong_q])
                add("prompt router", p_s - p_w, te, seed, cascade=False)
            add("rules", -rules_accept[te], te, seed)
            # The draft's responses in the training folds, labelled by the grading under evaluation.
            ver = fit_features(verifier_features[tr], data.weak[tr], None, cfg, embedder)
            p_ok = ver.probabilities(verifier_features[te])
            add("verifier", -p_ok, te, seed)
            if prompt_features is not None:
                add("verifier + router", p_s - p_ok, te, seed)
            add("perfect verifier", -data.weak[te], te, seed)
            add("oracle", data.strong_q[te] - data.weak[te], te, seed, cascade=False)
            if on_fold:
                on_fold(seed, j)
    return KFoldResult(rows, n, k, len(seeds), oof)


def threshold_table(accept: np.ndarray, data: CascadeData, shares: Sequence[float] = (0.1, 0.2, 0.3, 0.5)) -> list[dict]:
    """For target escalation shares: the acceptance threshold, quality and cost per prompt."""
    out = []
    order = np.sort(accept)
    for s in shares:
        t = float(order[min(int(round(s * len(order))), len(order) - 1)]) if len(order) else 0.0
        esc = accept < t
        q = np.where(esc, data.strong_q, data.weak).mean()
        cost = (data.cost_weak + np.where(esc, data.cost_strong, 0.0)).mean()
        out.append({"target_share": s, "threshold": t, "escalated": float(esc.mean()), "quality": float(q),
                    "cost_per_prompt": float(cost)})
    return out
