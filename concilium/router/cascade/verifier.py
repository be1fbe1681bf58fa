"""The `verifier` scorer: P(draft is good | prompt, draft) from features of the answer.

Two forms:

- `RulesVerifier` needs no training: it starts from 1 and multiplies in a penalty for each
  warning sign — an arithmetic step whose written result is wrong (`answers.check_arithmetic`),
  no `####`/boxed final answer, a non-integer final answer, a truncated answer. Useful when no
  trained verifier fits the traffic.
- `Verifier`: a logistic regression over `features.pair_features` (blocks named in its config),
  trained by `train_verifier` from outcome records that carry `responses` (see
  `outcomes.Outcome.responses`): every (prompt, model's response, model's score) is one example.
  Dense blocks are standardised; the high-dimensional ones (hashed n-grams, embeddings) are only
  centred and scaled by `block_scale`, so one L2 penalty suits both. The inverse regularisation C
  is chosen by 3-fold cross-validated log-loss on the training records themselves.

A trained verifier is a folder (or part of a router artifact folder), never a pickle:

    verifier.json           format, version, blocks, hash_dim, C, dense feature names, training report
    verifier.safetensors    w (F,), b (1,), mu (F,), sd (F,)

`load_verifier()` reads the one shipped in the default router artifact; `load_verifier(DIR)` reads
another (`concilium router train` writes one next to the router when its records carry responses).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from concilium.router.artifact import read_versioned_json
from concilium.router.cascade.answers import check_arithmetic, final_answer, unescape_markdown
from concilium.router.cascade.base import Draft, Scorer
from concilium.router.cascade.features import (
    ANSWER_FEATURES,
    BLOCKS,
    answer_features,
    feature_names,
    pair_features,
)
from concilium.router.features import FEATURE_NAMES as LEXICAL_NAMES
from concilium.router.outcomes import Outcome, OutcomeError

FORMAT = "concilium-verifier"
VERSION = 1
CONFIG = "verifier.json"
WEIGHTS = "verifier.safetensors"
DENSE_BLOCKS = ("answer", "prompt_lexical", "answer_lexical")


class VerifierError(ValueError):
    """A verifier folder that cannot be loaded, or training data that cannot train one."""


@dataclass
class VerifierConfig:
    blocks: tuple[str, ...] = ("answer", "prompt_lexical", "answer_lexical", "hashed")
    hash_dim: int = 4096  # buckets of the `hashed` block (answer half + prompt half)
    block_scale: dict[str, float] = field(default_factory=lambda: {"hashed": 3.0, "embedding": 3.0})
    c: float | None = None  # inverse L2 strength; None: chosen from c_grid by 3-fold CV log-loss
    c_grid: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0)
    max_iter: int = 3000
    min_examples: int = 20

    def __post_init__(self) -> None:
        self.blocks = tuple(self.blocks)
        self.c_grid = tuple(self.c_grid)
        unknown = [b for b in self.blocks if b not in BLOCKS]
        if unknown:
            raise VerifierError(f"unknown feature block {unknown[0]!r}; known: {', '.join(BLOCKS)}")
        if "hashed" in self.blocks and self.hash_dim < 2:
            raise VerifierError("the hashed block needs hash_dim >= 2")


def _block_sizes(cfg: VerifierConfig, embedding_dim: int) -> list[tuple[str, int]]:
    sizes = {"answer": len(ANSWER_FEATURES), "prompt_lexical": len(LEXICAL_NAMES),
             "answer_lexical": len(LEXICAL_NAMES), "hashed": cfg.hash_dim, "embedding": 2 * embedding_dim}
    return [(b, sizes[b]) for b in cfg.blocks]


class Verifier(Scorer):
    name = "verifier"

    def __init__(self, w: np.ndarray, b: float, mu: np.ndarray, sd: np.ndarray, config: VerifierConfig,
                 embedder: Any = None, meta: dict[str, Any] | None = None) -> None:
        if "embedding" in config.blocks and embedder is None:
            raise VerifierError("this verifier reads embeddings: it needs the router's static embedder")
        self.config = config
        self.embedder = embedder
        self.meta = dict(meta or {})
        self.w_raw, self.b_raw = np.asarray(w, np.float64), float(b)
        self.mu, self.sd = np.asarray(mu, np.float64), np.asarray(sd, np.float64)
        # (x - mu) / sd @ w + b == x @ (w / sd) + (b - mu / sd @ w)
        self._w = (self.w_raw / self.sd).astype(np.float64)
        self._b = self.b_raw - float((self.mu / self.sd) @ self.w_raw)

    @property
    def n_features(self) -> int:
        return len(self.w_raw)

    def features(self, prompt: str, answer: str) -> np.ndarray:
        return pair_features(prompt, answer, self.config.blocks, self.config.hash_dim, self.embedder)

    def probability(self, prompt: str, answer: str) -> float:
        z = float(self.features(prompt, answer) @ self._w) + self._b
        return 1.0 / (1.0 + math.exp(-max(min(z, 50.0), -50.0)))

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """P(good) for a precomputed feature matrix (rows from `features`)."""
        z = np.clip(x.astype(np.float64) @ self._w + self._b, -50, 50)
        return 1.0 / (1.0 + np.exp(-z))

    def score_draft(self, draft: Draft) -> float:
        return self.probability(draft.prompt, draft.answer)

    def describe(self) -> dict[str, Any]:
        return {"scorer": self.name, "blocks": list(self.config.blocks),
                "trained_on": (self.meta.get("training") or {}).get("examples")}

    # --- storage -------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        arrays = {"w": self.w_raw.astype(np.float32), "b": np.array([self.b_raw], np.float32),
                  "mu": self.mu.astype(np.float32), "sd": self.sd.astype(np.float32)}
        save_file(arrays, str(folder / WEIGHTS))
        if "embedding" in self.config.blocks and not (folder / "embedder.safetensors").is_file():
            self.embedder.save(folder)
        dense = [n for n in feature_names([b for b in self.config.blocks if b in DENSE_BLOCKS])]
        cfg = {"format": FORMAT, "version": VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "config": asdict(self.config), "n_features": self.n_features, "dense_features": dense, **self.meta}
        (folder / CONFIG).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> Verifier:
        folder = Path(folder)
        path = folder / CONFIG
        if not path.is_file():
            raise VerifierError(f"{folder}: no trained verifier ({CONFIG} missing)")
        cfg = read_versioned_json(path, FORMAT, VERSION, VerifierError)
        try:
            config = VerifierConfig(**cfg["config"])
        except (KeyError, TypeError) as e:
            raise VerifierError(f"{path}: bad config ({e})") from None
        dense = feature_names([b for b in config.blocks if b in DENSE_BLOCKS])
        if cfg.get("dense_features") != dense:
            raise VerifierError(f"{path}: trained with other answer features; retrain it with this version")
        try:
            arrays = load_file(str(folder / WEIGHTS))
            w, b, mu, sd = arrays["w"], float(arrays["b"][0]), arrays["mu"], arrays["sd"]
        except (OSError, KeyError, ValueError, IndexError) as e:
            raise VerifierError(f"{folder}: cannot read the weights ({e})") from None
        embedder = None
        if "embedding" in config.blocks:
            from concilium.router.embedder import StaticEmbedder

            try:
                embedder = StaticEmbedder.load(folder)
            except (OSError, ValueError, KeyError) as e:
                raise VerifierError(f"{folder}: cannot read the embedder ({e})") from None
        n = sum(s for _, s in _block_sizes(config, embedder.dim if embedder else 0))
        if not (w.shape == mu.shape == sd.shape == (n,)):
            raise VerifierError(f"{folder}: weight shapes do not match {CONFIG} ({w.shape} vs {n} features)")
        meta = {k: v for k, v in cfg.items()
                if k not in ("format", "version", "created", "config", "n_features", "dense_features")}
        return cls(w, b, mu, sd, config, embedder, meta)


def load_verifier(path: str | Path | None = None) -> Verifier:
    """The verifier in a folder (default: the one shipped with the default router artifact)."""
    if path is None:
        from concilium.router.learned import DEFAULT_ARTIFACT

        path = DEFAULT_ARTIFACT
    return Verifier.load(path)


# --- training ----------------------------------------------------------------------------------
@dataclass
class Examples:
    prompts: list[str]
    answers: list[str]
    labels: np.ndarray  # 0..1 (fractional scores allowed)
    weights: np.ndarray
    models: list[str]


def verifier_examples(records: Sequence[Outcome], models: Sequence[str] | None = None) -> Examples:
    """One example per (record, model) with both a response and a score (only `models` if given)."""
    p, a, y, w, m = [], [], [], [], []
    for r in records:
        for model, text in r.responses.items():
            if model in r.scores and (models is None or model in models) and text:
                p.append(r.prompt)
                a.append(text)
                y.append(r.scores[model])
                w.append(r.weight)
                m.append(model)
    return Examples(p, a, np.asarray(y, np.float64), np.asarray(w, np.float64), m)


def featurise(prompts: Sequence[str], answers: Sequence[str], config: VerifierConfig, embedder: Any = None) -> np.ndarray:
    if not prompts:
        return np.zeros((0, 0), np.float32)
    return np.stack([pair_features(p, a, config.blocks, config.hash_dim, embedder)
                     for p, a in zip(prompts, answers, strict=True)])


def standardiser(x: np.ndarray, config: VerifierConfig, embedding_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sd): dense blocks standardised, hashed/embedding blocks centred and scaled."""
    mu = x.mean(axis=0).astype(np.float64)
    sd = np.ones(x.shape[1], np.float64)
    i = 0
    for b, size in _block_sizes(config, embedding_dim):
        if b in DENSE_BLOCKS:
            sd[i:i + size] = x[:, i:i + size].std(axis=0) + 1e-6
        else:
            sd[i:i + size] = 1.0 / config.block_scale.get(b, 1.0)
        i += size
    return mu, sd


def _fit(z: np.ndarray, y: np.ndarray, w: np.ndarray, c: float, max_iter: int) -> tuple[np.ndarray, float]:
    from sklearn.linear_model import LogisticRegression

    keep1, keep0 = y > 0, y < 1  # a fractional score s: a success with weight s, a failure with 1 - s
    x = np.vstack([z[keep1], z[keep0]])
    t = np.r_[np.ones(keep1.sum()), np.zeros(keep0.sum())]
    sw = np.r_[y[keep1] * w[keep1], (1 - y[keep0]) * w[keep0]]
    lr = LogisticRegression(C=c, max_iter=max_iter)
    lr.fit(x, t, sample_weight=sw)
    return lr.coef_[0].astype(np.float64), float(lr.intercept_[0])


def choose_c(z: np.ndarray, y: np.ndarray, w: np.ndarray, grid: Sequence[float], max_iter: int,
             seed: int = 0) -> tuple[float, dict[str, float]]:
    """The C of `grid` with the lowest 3-fold cross-validated log-loss (on these examples only)."""
    rng = np.random.default_rng(seed)
    fold = rng.permutation(len(y)) % 3
    losses = {}
    for c in grid:
        total = 0.0
        for k in range(3):
            tr, te = fold != k, fold == k
            coef, b = _fit(z[tr], y[tr], w[tr], c, max_iter)
            p = np.clip(1 / (1 + np.exp(-(z[te] @ coef + b))), 1e-6, 1 - 1e-6)
            total += float(-(w[te] * (y[te] * np.log(p) + (1 - y[te]) * np.log(1 - p))).sum())
        losses[str(c)] = total / float(w.sum())
    best = min(grid, key=lambda c: losses[str(c)])
    return float(best), losses


def train_verifier(records: Sequence[Outcome], config: VerifierConfig | None = None, embedder: Any = None,
                   models: Sequence[str] | None = None, features: np.ndarray | None = None,
                   meta: dict[str, Any] | None = None) -> Verifier:
    """Fit a verifier on every (prompt, response, score) of `records` (only `models` if given).

    `features` may be given precomputed (rows aligned with `verifier_examples(records, models)`).
    """
    cfg = config or VerifierConfig()
    if "embedding" in cfg.blocks and embedder is None:
        raise VerifierError("the embedding block needs the router's static embedder")
    ex = verifier_examples(records, models)
    if len(ex.labels) < cfg.min_examples:
        raise VerifierError(f"a verifier needs at least {cfg.min_examples} records with a response and a score; "
                            f"got {len(ex.labels)}")
    if not ((ex.labels > 0).any() and (ex.labels < 1).any()):
        raise VerifierError("a verifier needs both good and bad responses among its examples")
    x = featurise(ex.prompts, ex.answers, cfg, embedder) if features is None else features
    ver = fit_features(x, ex.labels, ex.weights, cfg, embedder)
    counts: dict[str, int] = {}
    for m in ex.models:
        counts[m] = counts.get(m, 0) + 1
    ver.meta["training"].update({"examples": len(ex.labels), "models": counts,
                                 "mean_label": round(float(ex.labels.mean()), 4)})
    ver.meta.update(meta or {})
    return ver


def fit_features(x: np.ndarray, labels: np.ndarray, weights: np.ndarray | None, config: VerifierConfig,
                 embedder: Any = None) -> Verifier:
    """A verifier fitted on a precomputed feature matrix and labels (0..1) — what `train_verifier`
    does after collecting its examples; the offline evaluation calls it per fold."""
    cfg = config
    y = np.asarray(labels, np.float64)
    w = np.ones(len(y)) if weights is None else np.asarray(weights, np.float64)
    mu, sd = standardiser(x, cfg, embedder.dim if embedder is not None else 0)
    z = (x - mu) / sd
    losses: dict[str, float] = {}
    c = cfg.c
    if c is None:
        c, losses = choose_c(z, y, w, cfg.c_grid, cfg.max_iter)
    coef, b = _fit(z, y, w, c, cfg.max_iter)
    return Verifier(coef, b, mu, sd, cfg, embedder, {"training": {"c": c, "cv_log_loss": losses}})


# --- no training -------------------------------------------------------------------------------
class RulesVerifier(Scorer):
    """P(good) from warning signs alone; each present sign multiplies the score by its factor.

    Factors (defaults) follow the measured share of correct answers with each sign in RouteLLM's
    GSM8K Mixtral answers (see docs/router.md): a wrong arithmetic step ~13% correct, a non-integer
    final answer ~4%, no `####`/boxed final answer ~23%.
    """

    name = "verifier-rules"

    def __init__(self, base: float = 0.8, wrong_arithmetic: float = 0.2, non_integer: float = 0.1,
                 no_final: float = 0.35, truncated: float = 0.5) -> None:
        self.base, self.wrong_arithmetic, self.non_integer = base, wrong_arithmetic, non_integer
        self.no_final, self.truncated = no_final, truncated

    def signs(self, prompt: str, answer: str) -> dict[str, bool]:
        text = unescape_markdown(answer)
        fa = final_answer(text)
        f = dict(zip(ANSWER_FEATURES, answer_features(prompt, text), strict=True))
        return {"wrong_arithmetic": check_arithmetic(text).wrong > 0,
                "non_integer": fa.value is not None and not fa.is_integer,
                "no_final": fa.kind not in ("marker", "boxed"),
                "truncated": bool(f["truncated"])}

    def score_draft(self, draft: Draft) -> float:
        s = self.base
        for sign, present in self.signs(draft.prompt, draft.answer).items():
            if present:
                s *= getattr(self, sign)
        return s


def examples_from(records: Sequence[Outcome]) -> int:
    """How many verifier examples the records hold (records with responses and scores)."""
    return sum(1 for r in records for m in r.responses if m in r.scores)


__all__ = ["Verifier", "VerifierConfig", "VerifierError", "RulesVerifier", "load_verifier", "train_verifier",
           "verifier_examples", "featurise", "OutcomeError"]
