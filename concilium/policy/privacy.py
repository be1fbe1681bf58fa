"""The policy's `privacy:` section: which PII detectors run, where a prompt with PII may go, and what
reaches the logs. Detection and redaction themselves are the guard's."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from concilium.policy.schema import ModelSpec

DETECTORS = ("email", "phone", "card", "iban", "api_key")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OnPII(_Strict):
    """Where a prompt that contains PII may go: models with one of these tags or provider kinds."""

    allow_tags: list[str] = Field(default_factory=list)
    allow_providers: list[Literal["local", "openai", "litellm"]] = Field(default_factory=list)


class Privacy(_Strict):
    detect: list[Literal["email", "phone", "card", "iban", "api_key"]] = Field(
        default_factory=lambda: list(DETECTORS))
    on_pii: OnPII | None = None  # unset: PII only matters to routes that match on `pii`
    log_prompts: bool = False  # log each prompt (redacted when redact_logs) at INFO
    redact_logs: bool = True  # scrub PII and secrets from every log line

    def may_see_pii(self, spec: ModelSpec) -> bool:
        """With `on_pii`, whether a prompt with PII may reach this model (by its tags or provider)."""
        on = self.on_pii
        return on is not None and (bool(set(spec.tags) & set(on.allow_tags)) or spec.provider in on.allow_providers)
