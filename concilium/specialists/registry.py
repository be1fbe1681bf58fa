"""Build providers from a policy, reusing unchanged ones across policy reloads."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from concilium.policy.schema import ModelSpec, Policy
from concilium.specialists.base import Provider

log = logging.getLogger("concilium.providers")


def make_provider(name: str, spec: ModelSpec) -> Provider:
    if spec.provider == "openai":
        from concilium.specialists.openai_compat import OpenAICompatProvider

        return OpenAICompatProvider(name, spec)
    if spec.provider == "litellm":
        from concilium.specialists.litellm_adapter import LiteLLMProvider

        return LiteLLMProvider(name, spec)
    if spec.provider == "local" and spec.kind == "embedding":
        from concilium.specialists.local_embedding import LocalEmbeddingProvider

        return LocalEmbeddingProvider(name, spec)
    if spec.provider == "local":
        from concilium.specialists.local import LocalProvider

        return LocalProvider(name, spec)
    raise ValueError(f"unknown provider kind {spec.provider!r}")


class Registry:
    """Model name -> Provider for one policy version."""

    def __init__(self, providers: dict[str, Provider]) -> None:
        self.providers = providers

    @classmethod
    def build(cls, policy: Policy, previous: Registry | None = None) -> Registry:
        old = previous.providers if previous else {}
        out: dict[str, Provider] = {}
        for name, spec in policy.models.items():
            prev = old.get(name)
            out[name] = prev if prev is not None and prev.spec == spec else make_provider(name, spec)
        return cls(out)

    def retired(self, newer: Registry) -> list[Provider]:
        """Providers of this registry that `newer` no longer uses (close them after a grace period)."""
        keep = {id(p) for p in newer.providers.values()}
        return [p for p in self.providers.values() if id(p) not in keep]

    def get(self, name: str) -> Provider:
        return self.providers[name]

    def unavailable_reason(self, name: str) -> str | None:
        p = self.providers.get(name)
        return "not in the policy" if p is None else p.unavailable_reason()

    def unsupported(self, name: str, body: dict[str, Any]) -> tuple[str, str] | None:
        p = self.providers.get(name)
        return None if p is None else p.unsupported(body)

    def context_limit(self, name: str) -> int | None:
        p = self.providers.get(name)
        return None if p is None else p.context_limit()

    async def start_all(self) -> None:
        """Start every callable provider; a local model that fails to load is reported, not fatal."""
        async def one(p: Provider) -> None:
            if p.unavailable_reason():
                return
            try:
                await p.start()
            except Exception as e:
                log.warning("provider %s failed to start: %s", p.name, e)

        await asyncio.gather(*(one(p) for p in self.providers.values()))

    async def close_all(self) -> None:
        await asyncio.gather(*(p.close() for p in self.providers.values()), return_exceptions=True)
