"""Evaluate a trained dispatcher on held-out outcome records.

Two models: APGR, CPT(50%), CPT(80%) of the router beside random, each single model and the
oracle. N models with costs: the quality-cost table and AIQ of the router (its trade-off knob
swept), each single model, the random mix and the oracle. See `metrics.py` for the definitions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from concilium.router import metrics as M
from concilium.router.artifact import Artifact
from concilium.router.outcomes import Outcome, OutcomeError
from concilium.router.predictor import Predictor


@dataclass
class EvalData:
    """Outcome records restricted to models every record scores, as matrices."""

    models: list[str]
    quality: np.ndarray  # (n, m) true scores
    cost: np.ndarray | None  # (n, m) or None when the records carry no costs
    prompts: list[str] = field(default_factory=list)


def eval_matrix(records: list[Outcome], models: list[str] | None = None) -> EvalData:
    if not records:
        raise OutcomeError("no evaluation records")
    if models is None:
        common = set(records[0].scores)
        for r in records[1:]:
            common &= set(r.scores)
        models = [m for m in records[0].scores if m in common]
    if len(models) < 2:
        raise OutcomeError("evaluation needs at least two models scored on every record")
    q = np.array([[r.scores[m] for m in models] for r in records], dtype=np.float64)
    has_cost = all(all(m in r.costs for m in models) for r in records)
    c = np.array([[r.costs[m] for m in models] for r in records], dtype=np.float64) if has_cost else None
    return EvalData(models, q, c, [r.prompt for r in records])


def predicted_quality(artifact: Artifact, data: EvalData, features: np.ndarray | None = None) -> np.ndarray:
    """(n, m) predicted P(answers well) for the evaluation models, in `data.models` order."""
    from concilium.router.learned import _name_keys

    index: dict[str, int] = {}
    for i, e in enumerate(artifact.models):
        for alias in [e.name, *e.aliases]:
            for k in _name_keys(alias):
                index.setdefault(k, i)
    cols = []
    for m in data.models:
        hit = next((index[k] for k in _name_keys(m) if k in index), None)
        if hit is None:
            raise OutcomeError(f"the router has no predictor for {m!r}; it knows {', '.join(artifact.model_names)}")
        cols.append(hit)
    pred = Predictor(artifact)
    x = pred.features_batch(data.prompts) if features is None else features
    q, _, _ = pred.forward_batch(x)
    return q[:, cols]


def two_model_report(pred: np.ndarray, data: EvalData) -> dict[str, Any]:
    """`pred`: (n, 2) predicted quality. The model with the higher true mean is 'strong'."""
    means = data.quality.mean(0)
    s, w = (0, 1) if means[0] > means[1] else (1, 0)
    weak, strong = data.quality[:, w], data.quality[:, s]
    rows = {}
    for name, score in (
        ("router", pred[:, s] - pred[:, w]),
        ("random", np.zeros(len(weak))),  # one tie block = the expected random router
        ("oracle", M.oracle_scores(weak, strong)),
    ):
        curve = M.two_model_curve(score, weak, strong)
        rows[name] = {"apgr": curve.apgr, "cpt50": curve.cpt(0.5), "cpt80": curve.cpt(0.8), "curve": curve}
    return {
        "weak": data.models[w],
        "strong": data.models[s],
        "quality_weak": float(weak.mean()),
        "quality_strong": float(strong.mean()),
        "rows": rows,
    }


def n_model_report(pred: np.ndarray, data: EvalData) -> dict[str, Any]:
    if data.cost is None:
        raise OutcomeError("the quality-cost table needs `costs` for every model on every record")
    q, c = data.quality, data.cost
    single = M.random_mix_points(q, c)
    c_min, c_max = float(single[:, 0].min()), float(single[:, 0].max())
    if c_max <= c_min:
        raise OutcomeError("all models cost the same on these records; AIQ is undefined")
    rows: dict[str, dict[str, Any]] = {}
    for j, m in enumerate(data.models):
        rows[m] = {"kind": "single", "cost": float(single[j, 0]), "quality": float(single[j, 1]),
                   "aiq": M.aiq(single[j : j + 1], c_min, c_max), "points": single[j : j + 1]}
    for name, pts in (("random mix", single), ("router", M.tradeoff_curve(pred, q, c)),
                      ("oracle", M.oracle_points(q, c))):
        best = pts[np.argmax(pts[:, 1])]
        rows[name] = {"kind": name, "cost": float(best[0]), "quality": float(best[1]),
                      "aiq": M.aiq(pts, c_min, c_max), "points": pts}
    return {"c_min": c_min, "c_max": c_max, "rows": rows}


def format_two_model(rep: dict[str, Any]) -> str:
    lines = [
        f"weak = {rep['weak']} (quality {rep['quality_weak']:.3f}), strong = {rep['strong']} "
        f"(quality {rep['quality_strong']:.3f})",
        f"{'router':<12} {'APGR':>7} {'CPT(50%)':>9} {'CPT(80%)':>9}",
    ]
    for name, r in rep["rows"].items():
        lines.append(f"{name:<12} {r['apgr']:7.3f} {r['cpt50']:9.1%} {r['cpt80']:9.1%}")
    lines.append(f"{'weak only':<12} {0.0:7.3f} {'-':>9} {'-':>9}")
    lines.append(f"{'strong only':<12} {1.0:7.3f} {'100.0%':>9} {'100.0%':>9}")
    return "\n".join(lines)


def format_n_model(rep: dict[str, Any]) -> str:
    lines = [f"{'router / model':<36} {'avg cost $':>11} {'quality':>8} {'AIQ':>7}"]
    for name, r in sorted(rep["rows"].items(), key=lambda kv: (kv[1]["kind"] != "single", kv[1]["cost"])):
        label = name if r["kind"] == "single" else f"[{name}] (best point)"
        lines.append(f"{label:<36} {r['cost']:11.3e} {r['quality']:8.3f} {r['aiq']:7.3f}")
    lines.append(f"AIQ over normalised cost [{rep['c_min']:.3e}, {rep['c_max']:.3e}] $ per request")
    return "\n".join(lines)


def plot(two: dict[str, Any] | None, many: dict[str, Any] | None, path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in (two, many) if p is not None]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    i = 0
    if two is not None:
        ax = axes[0, i]
        i += 1
        for name, r in two["rows"].items():
            cv = r["curve"]
            ax.plot(cv.share, cv.quality, label=f"{name} (APGR {r['apgr']:.3f})")
        ax.axhline(two["quality_weak"], ls=":", c="grey")
        ax.axhline(two["quality_strong"], ls="--", c="grey")
        ax.set_xlabel(f"share of calls to {two['strong']}")
        ax.set_ylabel("quality")
        ax.legend(fontsize=8)
    if many is not None:
        ax = axes[0, i]
        for name, r in many["rows"].items():
            pts = r["points"]
            if r["kind"] == "single":
                ax.scatter(pts[:, 0], pts[:, 1], s=18)
                ax.annotate(name, (pts[0, 0], pts[0, 1]), fontsize=6)
            else:
                hull = M.upper_hull(pts)
                ax.plot(hull[:, 0], hull[:, 1], marker=".", label=f"{name} (AIQ {r['aiq']:.3f})")
        ax.set_xlabel("average cost per request ($)")
        ax.set_ylabel("quality")
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
