"""The provider interface: everything that answers a chat request implements `Provider`.

Requests and responses are OpenAI chat-completions JSON, as plain dicts. `stream()` yields whole
SSE events as bytes (b"data: {...}\\n\\n"), never the final b"data: [DONE]" line: the caller writes
that. OpenAI-compatible upstreams pass their bytes through untouched; other providers encode their
chunks with `sse_event()`.
"""

from __future__ import annotations

import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import Any

import orjson

from concilium.policy.schema import ModelSpec

# The OpenAI error code for a prompt longer than the model's context: another model may still take it.
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"


class ProviderError(Exception):
    """A failed call. `retryable` errors are retried and then fall back down the plan."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 502,
        retryable: bool = True,
        retry_after: float | None = None,
        code: str | None = None,
        type: str = "upstream_error",
        fallback: bool | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param  # the request field at fault, for client errors
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after
        self.code = code
        self.type = type
        # Whether another candidate may be tried. Client errors (a bad request) are not.
        self.fallback = retryable if fallback is None else fallback


def classify_status(status: int) -> tuple[bool, bool]:
    """(retryable, fallback) for an upstream HTTP status."""
    if status in (408, 409, 429) or status >= 500:
        return True, True
    if status in (401, 403, 404):  # this provider is misconfigured; another may work
        return False, True
    return False, False  # 400, 413, 422 ...: the request itself is bad


class Provider(ABC):
    """One model behind one protocol. Instances are shared by concurrent requests."""

    kind: str = "base"

    def __init__(self, name: str, spec: ModelSpec) -> None:
        self.name = name
        self.spec = spec

    def unavailable_reason(self) -> str | None:
        """Why this provider cannot be called right now (e.g. its API key is not set), or None."""
        return None

    def unsupported(self, body: dict[str, Any]) -> tuple[str, str] | None:
        """(param, why) when this provider cannot honour a feature the request asks for (tools it
        must call, a JSON response format, images ...), else None. Upstream APIs pass requests on
        as they are and decide themselves; the router skips a model that says no here."""
        return None

    def context_limit(self) -> int | None:
        """Tokens of context this provider really serves when it is fewer than the policy's
        `context_window` (a local runtime's preallocated cache), or None."""
        return None

    async def start(self) -> None:
        """Open sessions / load weights. Called once before first use."""
        return None

    async def close(self) -> None:
        """Release sessions, threads and memory."""
        return None

    @abstractmethod
    async def complete(self, body: dict[str, Any], *, timeout: float) -> dict[str, Any]:
        """Non-streaming chat completion; returns an OpenAI `chat.completion` dict."""

    @abstractmethod
    def stream(self, body: dict[str, Any], *, timeout: float) -> AsyncIterator[bytes]:
        """Streaming chat completion; yields SSE events (bytes), without the final [DONE]."""

    async def embed(self, body: dict[str, Any], *, timeout: float) -> dict[str, Any]:
        """Embeddings (`kind: embedding` models): an OpenAI embeddings request (`input`, optional
        `dimensions`, `encoding_format`, `user`) -> an OpenAI `list` of `embedding` objects with usage."""
        raise ProviderError(f"{self.name}: this provider does not serve embeddings", status=400,
                            retryable=False, code="model_not_supported")


def sse_event(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def new_completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def chunk(
    cid: str,
    model: str,
    created: int,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    usage: dict[str, int] | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}] if delta is not None else [],
    }
    if usage is not None:
        out["usage"] = usage
    return out


def completion(
    cid: str, model: str, text: str, finish_reason: str, usage: dict[str, int], created: int | None = None
) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": created or int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage,
    }


def usage_dict(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
