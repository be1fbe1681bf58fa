"""Providers that speak another protocol (Anthropic, Bedrock, Vertex, ...) through litellm.

litellm is imported lazily and offline-safe: the price map is read from the installed package, not
fetched, and its logging is quiet.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from concilium.specialists.base import (
    CONTEXT_LENGTH_EXCEEDED,
    Provider,
    ProviderError,
    classify_status,
    sse_event,
)

_PASS = ("messages", "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "tools",
         "tool_choice", "seed", "response_format", "presence_penalty", "frequency_penalty", "n", "user",
         "reasoning_effort", "parallel_tool_calls", "logprobs", "top_logprobs")


def import_litellm() -> Any:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    litellm.suppress_debug_info = True
    litellm.set_verbose = False
    litellm.drop_params = True
    return litellm


def _to_provider_error(name: str, e: Exception) -> ProviderError:
    status = getattr(e, "status_code", None)
    if isinstance(e, asyncio.TimeoutError | TimeoutError) or type(e).__name__ == "Timeout":
        return ProviderError(f"{name}: timed out", status=504, code="timeout")
    if not isinstance(status, int):
        return ProviderError(f"{name}: {type(e).__name__}: {e}", code="connection_error")
    retryable, fallback = classify_status(status)
    code = f"upstream_{status}"
    if type(e).__name__ == "ContextWindowExceededError":  # a model with a longer context may take it
        fallback, code = True, CONTEXT_LENGTH_EXCEEDED
    retry_after = None
    resp = getattr(e, "response", None)
    headers = getattr(resp, "headers", None)
    if headers is not None and headers.get("retry-after"):
        try:
            retry_after = float(headers.get("retry-after"))
        except ValueError:
            retry_after = None
    return ProviderError(f"{name}: upstream answered {status}: {getattr(e, 'message', e)}",
                         status=status if status < 500 else 502, retryable=retryable, fallback=fallback,
                         retry_after=retry_after, code=code)


class LiteLLMProvider(Provider):
    kind = "litellm"

    def __init__(self, name: str, spec: Any) -> None:
        super().__init__(name, spec)
        self._litellm: Any = None

    def unavailable_reason(self) -> str | None:
        if self.spec.api_key_env and not os.environ.get(self.spec.api_key_env):
            return f"{self.spec.api_key_env} is not set"
        return None

    async def start(self) -> None:
        self._litellm = await asyncio.to_thread(import_litellm)

    def _kwargs(self, body: dict[str, Any], timeout: float, stream: bool) -> dict[str, Any]:
        kw: dict[str, Any] = {k: body[k] for k in _PASS if k in body}
        kw.update(model=self.spec.model, timeout=timeout, stream=stream, num_retries=0)
        kw.update(self.spec.options)
        if self.spec.base_url:
            kw["api_base"] = self.spec.base_url
        if self.spec.api_key_env:
            kw["api_key"] = os.environ.get(self.spec.api_key_env)
        if stream:
            kw["stream_options"] = {"include_usage": True}
        return kw

    async def complete(self, body: dict[str, Any], *, timeout: float) -> dict[str, Any]:
        if self._litellm is None:
            await self.start()
        try:
            resp = await self._litellm.acompletion(**self._kwargs(body, timeout, stream=False))
        except Exception as e:  # litellm raises its own exception tree
            raise _to_provider_error(self.name, e) from None
        out = resp.model_dump()
        out.setdefault("created", int(time.time()))
        return out

    async def embed(self, body: dict[str, Any], *, timeout: float) -> dict[str, Any]:
        if self._litellm is None:
            await self.start()
        kw: dict[str, Any] = {k: body[k] for k in ("input", "dimensions", "encoding_format", "user")
                              if body.get(k) is not None}
        kw.update(model=self.spec.model, timeout=timeout, num_retries=0)
        kw.update(self.spec.options)
        if self.spec.base_url:
            kw["api_base"] = self.spec.base_url
        if self.spec.api_key_env:
            kw["api_key"] = os.environ.get(self.spec.api_key_env)
        try:
            resp = await self._litellm.aembedding(**kw)
        except Exception as e:  # litellm raises its own exception tree
            raise _to_provider_error(self.name, e) from None
        return resp.model_dump()

    async def stream(self, body: dict[str, Any], *, timeout: float) -> AsyncIterator[bytes]:
        if self._litellm is None:
            await self.start()
        try:
            resp = await self._litellm.acompletion(**self._kwargs(body, timeout, stream=True))
            async for ch in resp:
                yield sse_event(ch.model_dump(exclude_none=True))
        except ProviderError:
            raise
        except Exception as e:
            raise _to_provider_error(self.name, e) from None
