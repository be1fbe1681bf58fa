"""The policy file's schema.

A policy says which models exist, how to reach them, what they cost, and which requests go where.
Everything here is plain data; `concilium.policy.loader` turns a YAML file into a `Policy` and
reports errors with the file and the key path.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ProviderKind = Literal["local", "openai", "litellm"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Price(_Strict):
    """USD per million tokens."""

    input: float = Field(0.0, ge=0)
    output: float = Field(0.0, ge=0)


class ModelSpec(_Strict):
    provider: ProviderKind
    # Upstream model id (openai/litellm), or a path / built-in name for `local`.
    model: str
    base_url: str | None = None  # openai-compatible endpoint, e.g. https://api.openai.com/v1
    api_key_env: str | None = None  # name of the environment variable holding the key
    price: Price = Field(default_factory=Price)
    context_window: int = Field(8192, gt=0)
    max_output_tokens: int | None = Field(None, gt=0)
    tags: list[str] = Field(default_factory=list)
    tier: Literal["small", "medium", "large", "frontier"] | None = None
    timeout_s: float | None = Field(None, gt=0)
    # Extra keyword arguments for the provider (e.g. litellm's api_version, local dtype/device).
    options: dict[str, object] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_provider_fields(self) -> ModelSpec:
        if self.provider == "openai" and not self.base_url:
            raise ValueError("provider 'openai' needs base_url (e.g. https://api.openai.com/v1)")
        return self


class Range(_Strict):
    min: float | None = None
    max: float | None = None


class Match(_Strict):
    """All given conditions must hold for the route to match."""

    category: list[str] | None = None  # the router's predicted category is one of these
    difficulty: Range | None = None  # predicted difficulty 0..1 in range
    model: list[str] | None = None  # the client asked for one of these (virtual) model names
    metadata: dict[str, str] | None = None  # request `metadata` has these key/values
    tags: list[str] | None = None  # the request's `metadata.tags` includes all of these
    pii: bool | None = None  # the prompt does (true) / does not (false) contain PII
    reasoning_effort: list[str] | None = None  # request reasoning_effort is one of these
    background: bool | None = None  # the client asked for a background job


class Route(_Strict):
    name: str
    match: Match = Field(default_factory=Match)
    # Ordered models to try; with `rank: true` the learned router reorders them by the objective.
    targets: list[str] = Field(min_length=1)
    fallbacks: list[str] = Field(default_factory=list)
    rank: bool = True
    mode: Literal["interactive", "background"] = "interactive"
    queue: str | None = None
    timeout_s: float | None = Field(None, gt=0)
    retries: int | None = Field(None, ge=0, le=10)
    soft_timeout_s: float | None = Field(None, gt=0)  # background jobs: stop gracefully
    hard_timeout_s: float | None = Field(None, gt=0)  # background jobs: kill


class Retry(_Strict):
    attempts: int = Field(2, ge=0, le=10)  # retries per candidate (after the first try)
    backoff_s: float = Field(0.2, ge=0)
    backoff_max_s: float = Field(5.0, ge=0)
    retry_after_max_s: float = Field(10.0, ge=0)  # cap on an upstream's retry-after


class CircuitBreaker(_Strict):
    failures: int = Field(3, ge=1)  # consecutive failures that open the circuit
    cooldown_s: float = Field(30.0, ge=0)


class Objective(_Strict):
    """How the learned router turns predictions and prices into a ranking.

    - max_quality: highest predicted quality whose estimated cost is within `max_cost_usd`.
    - min_cost: cheapest model whose predicted quality is >= `quality_ratio` x the best candidate's.
    - tradeoff: maximise quality - lambda_per_usd * cost (willingness to pay per quality point).
    """

    kind: Literal["max_quality", "min_cost", "tradeoff"] = "min_cost"
    max_cost_usd: float | None = Field(None, ge=0)
    quality_ratio: float = Field(0.9, ge=0, le=1)
    lambda_per_usd: float = Field(100.0, ge=0)


class RouterConfig(_Strict):
    virtual_models: list[str] = Field(default_factory=lambda: ["concilium/auto"])
    artifact: str | None = None  # directory of a trained router; null = the shipped default
    learned: bool = True  # use predictions when an artifact is available
    objective: Objective = Field(default_factory=Objective)
    # Estimated output tokens used for cost estimates when the request sets no max_tokens.
    default_output_tokens: int = Field(256, gt=0)


class Limits(_Strict):
    max_body_bytes: int = Field(4 * 1024 * 1024, gt=0)
    default_timeout_s: float = Field(60.0, gt=0)


class Policy(_Strict):
    version: Literal[1] = 1
    models: dict[str, ModelSpec] = Field(min_length=1)
    routes: list[Route] = Field(min_length=1)
    router: RouterConfig = Field(default_factory=RouterConfig)
    retry: Retry = Field(default_factory=Retry)
    circuit_breaker: CircuitBreaker = Field(default_factory=CircuitBreaker)
    limits: Limits = Field(default_factory=Limits)
    # Sections owned by other parts of the gateway (jobs, keys, privacy) are validated there.
    jobs: dict[str, object] = Field(default_factory=dict)
    keys: list[dict[str, object]] = Field(default_factory=list)
    privacy: dict[str, object] = Field(default_factory=dict)

    @field_validator("models")
    @classmethod
    def _names(cls, v: dict[str, ModelSpec]) -> dict[str, ModelSpec]:
        for name in v:
            if not name or name.strip() != name:
                raise ValueError(f"model name {name!r} must be non-empty with no surrounding spaces")
        return v

    @model_validator(mode="after")
    def _references(self) -> Policy:
        seen: set[str] = set()
        for i, route in enumerate(self.routes):
            if route.name in seen:
                raise _PathError(("routes", i, "name"), f"duplicate route name {route.name!r}")
            seen.add(route.name)
            for field in ("targets", "fallbacks"):
                for j, name in enumerate(getattr(route, field)):
                    if name not in self.models:
                        raise _PathError(
                            ("routes", i, field, j),
                            f"unknown model {name!r}; defined models: {', '.join(sorted(self.models))}",
                        )
        for vm in self.router.virtual_models:
            if vm in self.models:
                raise _PathError(("router", "virtual_models"), f"{vm!r} is also a model name")
        return self


class _PathError(ValueError):
    """A cross-reference error that knows where in the file it is."""

    def __init__(self, loc: tuple[str | int, ...], msg: str) -> None:
        super().__init__(msg)
        self.loc = loc
        self.msg = msg
