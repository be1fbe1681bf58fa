"""The forward pass: text -> features -> category, difficulty and per-model quality probabilities.

All heads are linear over the same standardised features, so they are folded into one matrix at
load time and a request costs one tokenizer call, one gather-mean and one small matmul.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from concilium.router.artifact import DIFFICULTY_VALUES, Artifact
from concilium.router.features import lexical_features, lexical_matrix


@dataclass
class Outputs:
    quality: np.ndarray  # (M,) P(answers well) per artifact model
    category: np.ndarray  # (K,) probabilities
    difficulty: np.ndarray  # (3,) probabilities (easy, medium, hard)

    @property
    def difficulty_value(self) -> float:
        return float(self.difficulty @ np.asarray(DIFFICULTY_VALUES))


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


class Predictor:
    def __init__(self, artifact: Artifact) -> None:
        h = artifact.heads
        self.embedder = artifact.embedder
        w = np.concatenate([h.quality_w, h.category_w, h.difficulty_w], axis=1).astype(np.float64)
        b = np.concatenate([h.quality_b, h.category_b, h.difficulty_b]).astype(np.float64)
        inv_sd = 1.0 / h.sd.astype(np.float64)
        # (x - mu) / sd @ w + b  ==  x @ (w * inv_sd) + (b - (mu * inv_sd) @ w)
        self.w = np.ascontiguousarray(w * inv_sd[:, None], dtype=np.float32)
        self.b = (b - (h.mu * inv_sd) @ w).astype(np.float32)
        self.m = h.quality_w.shape[1]
        self.k = h.category_w.shape[1]

    def features(self, text: str, turns: int = 1) -> np.ndarray:
        return np.concatenate([self.embedder.encode(text), lexical_features(text, turns)])

    def features_batch(self, texts: list[str], turns: list[int] | None = None) -> np.ndarray:
        return np.hstack([self.embedder.encode_batch(texts), lexical_matrix(texts, turns)])

    def _split(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        m, k = self.m, self.k
        return _sigmoid(z[..., :m]), _softmax(z[..., m : m + k]), _softmax(z[..., m + k :])

    def forward(self, x: np.ndarray) -> Outputs:
        return Outputs(*self._split(x @ self.w + self.b))

    def forward_batch(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self._split(x @ self.w + self.b)
