"""Train a dispatcher artifact from outcome records.

Every head is a regularised logistic regression over the same features (static sentence
embedding + lexical features), standardised once:

- quality: one binary head per model, P(answers well); a fractional score s counts as s of a
  success and 1 - s of a failure;
- category: multinomial over `CATEGORIES`, rare classes up-weighted (1/sqrt(count)); a category with no example gets a
  constant large negative bias (never predicted);
- difficulty: multinomial over easy / medium / hard. When at least `min_difficulty_labels`
  records carry an explicit `difficulty` label, spread over at least two of the three classes, the
  head learns from those labels only; otherwise from the labels plus 1 - each other record's mean
  score over the models that answered it. Outcome-derived difficulty mixes "hard to recall"
  (short trivia that small models miss) with "hard to do": on WizardLM's 1-10 ratings it
  correlates negatively, while MATH's level labels transfer (see docs/router.md).

Output length per category is the median of the records' `output_tokens` where at least
`MIN_LENGTH_RECORDS` records of that category carry one, else a documented default.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from concilium.router.artifact import DIFFICULTY_LABELS, Artifact, Heads, ModelEntry
from concilium.router.categories import CATEGORIES
from concilium.router.embedder import StaticEmbedder
from concilium.router.features import N_FEATURES, lexical_matrix
from concilium.router.outcomes import Outcome, OutcomeError

log = logging.getLogger(__name__)

# Expected answer tokens per category where the training data has no response lengths.
DEFAULT_OUTPUT_TOKENS = {
    "code": 400.0,
    "math": 300.0,
    "reasoning": 300.0,
    "knowledge": 150.0,
    "creative": 450.0,
    "chat": 120.0,
    "extraction": 200.0,
}
MIN_LENGTH_RECORDS = 20
ABSENT_CLASS_BIAS = -20.0


@dataclass
class TrainConfig:
    c_quality: float = 0.001  # inverse regularisation strength (scikit-learn's C) on standardised features
    c_category: float = 0.01
    c_difficulty: float = 1.0  # difficulty from outcomes
    c_difficulty_labels: float = 0.01  # difficulty from explicit labels (few, so more regularised)
    min_difficulty_labels: int = 50  # fewer explicit labels than this: they join the outcome-derived ones
    max_iter: int = 3000
    min_records_per_model: int = 20
    difficulty_edges: tuple[float, float] = (1 / 3, 2 / 3)
    # Lexical features are few and dense: they are scaled up after standardisation, so the same L2
    # penalty restrains them less than the many embedding dimensions.
    lexical_scale: float = 3.0


@dataclass
class TrainReport:
    n_records: int = 0
    models: dict[str, int] = field(default_factory=dict)  # model -> records with a score
    skipped_models: dict[str, int] = field(default_factory=dict)  # too few records
    categories: dict[str, int] = field(default_factory=dict)
    difficulty: dict[str, int] = field(default_factory=dict)
    difficulty_from: str = "outcomes"  # or "labels"


def difficulty_target(r: Outcome, labels_only: bool = False) -> float | None:
    if r.difficulty is not None:
        return r.difficulty
    if r.scores and not labels_only:
        return 1.0 - float(np.mean(list(r.scores.values())))
    return None


def _difficulty_class(t: float, edges: tuple[float, float]) -> int:
    return 0 if t < edges[0] else (1 if t < edges[1] else 2)


def _enough_difficulty_labels(records: list[Outcome], cfg: TrainConfig) -> bool:
    labels = [r.difficulty for r in records if r.difficulty is not None]
    classes = {_difficulty_class(t, cfg.difficulty_edges) for t in labels}
    return len(labels) >= cfg.min_difficulty_labels and len(classes) >= 2


def _fit_logistic(z: np.ndarray, y: np.ndarray, w: np.ndarray, c: float, max_iter: int):
    from sklearn.linear_model import LogisticRegression

    lr = LogisticRegression(C=c, max_iter=max_iter)
    lr.fit(z, y, sample_weight=w)
    return lr


def fit_quality_head(z: np.ndarray, scores: np.ndarray, weights: np.ndarray, c: float, max_iter: int):
    """One model's head from fractional scores: each row is a success with weight s and a failure
    with weight 1 - s. Returns (coef (F,), intercept)."""
    keep1, keep0 = scores > 0, scores < 1
    x = np.vstack([z[keep1], z[keep0]])
    y = np.r_[np.ones(keep1.sum()), np.zeros(keep0.sum())]
    w = np.r_[scores[keep1] * weights[keep1], (1 - scores[keep0]) * weights[keep0]]
    if len(np.unique(y)) < 2:
        p = float(np.clip(scores.mean(), 1e-3, 1 - 1e-3))
        return np.zeros(z.shape[1]), float(np.log(p / (1 - p)))
    lr = _fit_logistic(x, y, w, c, max_iter)
    return lr.coef_[0], float(lr.intercept_[0])


def fit_multiclass_head(z: np.ndarray, y: np.ndarray, w: np.ndarray, n_classes: int, c: float, max_iter: int,
                        balanced: bool = True):
    """Multinomial head; classes with no example get a large negative bias. Returns (W (F,K), b (K,))."""
    coef = np.zeros((z.shape[1], n_classes))
    bias = np.full(n_classes, ABSENT_CLASS_BIAS)
    present = np.unique(y)
    if len(present) == 0:
        return coef, np.zeros(n_classes)
    if len(present) == 1:
        bias[present[0]] = 0.0
        return coef, bias
    if balanced:  # partly: weight ~ 1/sqrt(class count), so rare classes count without being overfit
        counts = np.bincount(y, minlength=n_classes).astype(float)
        cw = 1.0 / np.sqrt(counts[y])
        w = w * cw * (len(y) / cw.sum())
    lr = _fit_logistic(z, y, w, c, max_iter)
    classes = list(lr.classes_)
    if len(classes) == 2:  # scikit-learn returns one column for two classes
        coef[:, classes[1]], bias[classes[1]] = lr.coef_[0], lr.intercept_[0]
        bias[classes[0]] = 0.0
    else:
        for j, cl in enumerate(classes):
            coef[:, cl], bias[cl] = lr.coef_[j], lr.intercept_[j]
    return coef, bias


def featurise(records: list[Outcome], embedder: StaticEmbedder, progress: bool = False) -> np.ndarray:
    texts = [r.prompt for r in records]
    chunks = []
    step = 2048
    it = range(0, len(texts), step)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="features", unit="chunk", total=(len(texts) + step - 1) // step)
    for i in it:
        part = texts[i : i + step]
        chunks.append(np.hstack([embedder.encode_batch(part), lexical_matrix(part)]))
    return np.vstack(chunks) if chunks else np.zeros((0, embedder.dim), dtype=np.float32)


def train(
    records: list[Outcome],
    embedder: StaticEmbedder,
    config: TrainConfig | None = None,
    aliases: dict[str, list[str]] | None = None,
    meta: dict | None = None,
    progress: bool = False,
    features: np.ndarray | None = None,
    on_step: Callable[[str], None] | None = None,
) -> tuple[Artifact, TrainReport]:
    """Fit every head on `records`. `features` may be given precomputed (rows aligned with records)."""
    cfg = config or TrainConfig()
    if not records:
        raise OutcomeError("no training records")
    report = TrainReport(n_records=len(records))
    x = featurise(records, embedder, progress) if features is None else features
    mu = x.mean(axis=0)
    sd = x.std(axis=0) + 1e-6
    sd[-N_FEATURES:] /= cfg.lexical_scale
    z = (x - mu) / sd
    weights = np.array([r.weight for r in records], dtype=np.float64)
    n_feat = z.shape[1]

    # Quality heads, one per model with enough records.
    by_model: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        for m in r.scores:
            by_model.setdefault(m, []).append(i)
    entries, q_w, q_b = [], [], []
    steps = list(by_model.items())
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="quality heads", unit="model")
    for m, rows in steps:
        if len(rows) < cfg.min_records_per_model:
            report.skipped_models[m] = len(rows)
            continue
        idx = np.asarray(rows)
        s = np.array([records[i].scores[m] for i in idx])
        coef, b = fit_quality_head(z[idx], s, weights[idx], cfg.c_quality, cfg.max_iter)
        q_w.append(coef)
        q_b.append(b)
        entries.append(
            ModelEntry(name=m, aliases=list((aliases or {}).get(m, [])), n_train=len(idx), mean_score=round(float(s.mean()), 4))
        )
        report.models[m] = len(idx)
        if on_step:
            on_step(f"quality head {m}")
    if not entries:
        raise OutcomeError(
            f"no model has at least {cfg.min_records_per_model} scored records; got "
            + (", ".join(f"{m}: {n}" for m, n in report.skipped_models.items()) or "none")
        )

    # Category head.
    cat_rows = [i for i, r in enumerate(records) if r.category is not None]
    cat_y = np.array([CATEGORIES.index(records[i].category) for i in cat_rows], dtype=int)
    cat_w, cat_b = fit_multiclass_head(
        z[cat_rows] if cat_rows else np.zeros((0, n_feat)), cat_y, weights[cat_rows], len(CATEGORIES),
        cfg.c_category, cfg.max_iter,
    )
    report.categories = {c: int((cat_y == i).sum()) for i, c in enumerate(CATEGORIES)}

    # Difficulty head.
    d_rows, d_y = [], []
    lo, hi = cfg.difficulty_edges
    labels_only = _enough_difficulty_labels(records, cfg)
    report.difficulty_from = "labels" if labels_only else "outcomes"
    log.info("difficulty head trained from %s", report.difficulty_from)
    for i, r in enumerate(records):
        t = difficulty_target(r, labels_only)
        if t is not None:
            d_rows.append(i)
            d_y.append(_difficulty_class(t, (lo, hi)))
    d_y_arr = np.array(d_y, dtype=int)
    dif_w, dif_b = fit_multiclass_head(
        z[d_rows] if d_rows else np.zeros((0, n_feat)), d_y_arr, weights[d_rows], 3,
        cfg.c_difficulty_labels if labels_only else cfg.c_difficulty, cfg.max_iter,
        balanced=False,
    )
    report.difficulty = {lab: int((d_y_arr == i).sum()) for i, lab in enumerate(DIFFICULTY_LABELS)}

    # Output length per category.
    out_tokens = dict(DEFAULT_OUTPUT_TOKENS)
    lengths: dict[str, list[float]] = {}
    for r in records:
        if r.category and r.output_tokens:
            lengths.setdefault(r.category, []).append(float(np.mean(list(r.output_tokens.values()))))
    for c, vals in lengths.items():
        if len(vals) >= MIN_LENGTH_RECORDS:
            out_tokens[c] = round(float(np.median(vals)), 1)

    heads = Heads(
        mu=mu.astype(np.float32),
        sd=sd.astype(np.float32),
        quality_w=np.stack(q_w, axis=1),
        quality_b=np.array(q_b),
        category_w=cat_w,
        category_b=cat_b,
        difficulty_w=dif_w,
        difficulty_b=dif_b,
    )
    full_meta = {"training": {"config": asdict(cfg), "report": asdict(report)}, **(meta or {})}
    return Artifact(embedder, heads, entries, list(CATEGORIES), out_tokens, full_meta), report


def load_embedder(path: str | Path | None) -> StaticEmbedder:
    from concilium.router.learned import DEFAULT_ARTIFACT

    return StaticEmbedder.load(Path(path) if path else DEFAULT_ARTIFACT)
