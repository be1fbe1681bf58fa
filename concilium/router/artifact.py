"""A trained dispatcher on disk: JSON + safetensors, never pickles.

    DIR/router.json           format, feature config, categories, model list (with aliases),
                              output-length table, training data hashes, metrics
    DIR/heads.safetensors     feature standardisation (mu, sd) and the linear heads
    DIR/embedder.safetensors  the static embedder's int8 token table (+ tokenizer.json,
    DIR/tokenizer.json        embedder.json), see `embedder.StaticEmbedder`
    DIR/embedder.json
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from concilium.router.embedder import StaticEmbedder
from concilium.router.features import FEATURE_NAMES

FORMAT = "concilium-router"
VERSION = 1
CONFIG = "router.json"
HEADS = "heads.safetensors"
DIFFICULTY_LABELS = ("easy", "medium", "hard")
DIFFICULTY_VALUES = (0.0, 0.5, 1.0)


class ArtifactError(ValueError):
    """A router directory that cannot be loaded; the message says which file and why."""


def read_versioned_json(path: Path, fmt: str, version: int, error: type[Exception]) -> dict[str, Any]:
    """A saved artifact's JSON config, refused (as `error`) when it is not JSON or of another
    format or version. The caller checks that the file exists (its message names what is missing)."""
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e.msg})") from None
    if not isinstance(cfg, dict) or cfg.get("format") != fmt or cfg.get("version") != version:
        got = cfg if isinstance(cfg, dict) else {}
        raise error(f"{path}: expected format {fmt!r} version {version}, "
                    f"got {got.get('format')!r} version {got.get('version')!r}")
    return cfg


@dataclass
class Heads:
    """Linear heads over standardised features z = (x - mu) / sd."""

    mu: np.ndarray  # (F,)
    sd: np.ndarray  # (F,)
    quality_w: np.ndarray  # (F, M)
    quality_b: np.ndarray  # (M,)
    category_w: np.ndarray  # (F, K)
    category_b: np.ndarray  # (K,)
    difficulty_w: np.ndarray  # (F, 3)
    difficulty_b: np.ndarray  # (3,)

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in self.__dict__.items()}


@dataclass
class ModelEntry:
    name: str
    aliases: list[str] = field(default_factory=list)
    n_train: int = 0
    mean_score: float | None = None


@dataclass
class Artifact:
    embedder: StaticEmbedder
    heads: Heads
    models: list[ModelEntry]
    categories: list[str]
    # Expected answer length (tokens) per category, used for cost estimates.
    output_tokens: dict[str, float]
    meta: dict[str, Any] = field(default_factory=dict)  # training data hashes, metrics, settings

    @property
    def model_names(self) -> list[str]:
        return [m.name for m in self.models]

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.embedder.save(folder)
        save_file(self.heads.arrays(), str(folder / HEADS))
        config = {
            "format": FORMAT,
            "version": VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "features": {"lexical": list(FEATURE_NAMES), "embedding_dim": self.embedder.dim},
            "categories": self.categories,
            "difficulty_labels": list(DIFFICULTY_LABELS),
            "models": [m.__dict__ for m in self.models],
            "output_tokens": self.output_tokens,
            **self.meta,
        }
        (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> Artifact:
        folder = Path(folder)
        cfg_path = folder / CONFIG
        if not cfg_path.is_file():
            raise ArtifactError(f"{folder}: not a router artifact (no {CONFIG})")
        cfg = read_versioned_json(cfg_path, FORMAT, VERSION, ArtifactError)
        if cfg["features"]["lexical"] != list(FEATURE_NAMES):
            raise ArtifactError(f"{cfg_path}: trained with other lexical features; retrain it with this version")
        try:
            arrays = load_file(str(folder / HEADS))
            heads = Heads(**{k: arrays[k] for k in Heads.__dataclass_fields__})
            embedder = StaticEmbedder.load(folder)
        except (OSError, KeyError, ValueError) as e:
            raise ArtifactError(f"{folder}: cannot read the weights ({e})") from None
        models = [ModelEntry(**m) for m in cfg["models"]]
        n_feat = embedder.dim + len(FEATURE_NAMES)
        shapes_ok = (
            heads.mu.shape == (n_feat,)
            and heads.quality_w.shape == (n_feat, len(models))
            and heads.category_w.shape == (n_feat, len(cfg["categories"]))
            and heads.difficulty_w.shape == (n_feat, len(DIFFICULTY_LABELS))
        )
        if not shapes_ok:
            raise ArtifactError(f"{folder}: weight shapes do not match {CONFIG}")
        meta = {
            k: v
            for k, v in cfg.items()
            if k not in ("format", "version", "features", "categories", "difficulty_labels", "models", "output_tokens")
        }
        return cls(embedder, heads, models, list(cfg["categories"]), dict(cfg["output_tokens"]), meta)
