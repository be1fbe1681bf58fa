"""The policy file's schema.

A policy says which models exist, how to reach them, what they cost, and which requests go where.
Everything here is plain data; `concilium.policy.loader` turns a YAML file into a `Policy` and
reports errors with the file and the key path.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from concilium.policy.compose import Chain, Fusion, models_named
from concilium.policy.errors import PathError
from concilium.policy.jobs import JobsConfig
from concilium.policy.keys import KeysSection
from concilium.policy.learning import Learning
from concilium.policy.privacy import Privacy

ProviderKind = Literal["local", "openai", "litellm"]

# The request categories the dispatcher predicts; `match.category` names some of them.
CATEGORIES: tuple[str, ...] = ("code", "math", "reasoning", "knowledge", "creative", "chat", "extraction")


class _Strict(BaseModel):
    # Unknown keys are refused; so are .inf and .nan, which no number in a policy can mean.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class SamplingDefaults(_Strict):
    """Per-model request defaults, used only for the parameters the client leaves out."""

    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, gt=0)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = None
    stop: list[str] | None = Field(None, max_length=4)

    def fill(self, body: dict[str, Any]) -> dict[str, Any]:
        """`body` with these defaults added where it has no value (absent or null); the same object
        when none applies, and the caller's body is never changed."""
        if not self.model_fields_set:  # the common case: no defaults for this model
            return body
        missing = {k: v for k in self.model_fields_set if (v := getattr(self, k)) is not None and body.get(k) is None}
        if "max_tokens" in missing and body.get("max_completion_tokens") is not None:
            del missing["max_tokens"]  # the client bounded the answer under the newer name
        return {**body, **missing} if missing else body


class Price(_Strict):
    """USD per million tokens."""

    input: float = Field(0.0, ge=0)
    output: float = Field(0.0, ge=0)


def check_url(v: str | None) -> str | None:
    """An http(s) URL with a host (and a numeric port when it has one), or a ValueError saying why."""
    if v is None:
        return v
    try:
        parts = urlsplit(v)
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError as e:
        raise ValueError(f"expected an http:// or https:// URL, got {v!r} ({e})") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"expected an http:// or https:// URL such as https://api.openai.com/v1, got {v!r}")
    if not parts.hostname:
        raise ValueError(f"the URL {v!r} has no host")
    return v


class Deployment(_Strict):
    """One replica of an OpenAI-compatible model: requests balance over a model's deployments."""

    base_url: str
    api_key_env: str | None = None  # default: the model's own
    model: str | None = None  # the upstream model id when this replica names it differently
    weight: int = Field(1, ge=1, le=1000)  # share of the load: least in-flight requests per unit of weight

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        return check_url(v)  # type: ignore[return-value]


class DeploymentHealth(_Strict):
    """Per-deployment circuit breaker and health checks (GET {base_url}/models)."""

    failures: int = Field(3, ge=1)  # consecutive failed calls that take a deployment out
    cooldown_s: float = Field(30.0, ge=0)  # then one trial call may bring it back
    check_s: float | None = Field(10.0, gt=0)  # probe interval (null: no probes, the breaker only)
    check_timeout_s: float = Field(2.0, gt=0)


class ModelSpec(_Strict):
    provider: ProviderKind
    # `chat` models answer chat requests and routes; `embedding` models answer POST /v1/embeddings only.
    kind: Literal["chat", "embedding"] = "chat"
    # Upstream model id (openai/litellm), or a path / built-in name for `local`.
    model: str
    base_url: str | None = None  # openai-compatible endpoint, e.g. https://api.openai.com/v1
    api_key_env: str | None = None  # name of the environment variable holding the key
    price: Price = Field(default_factory=Price)
    context_window: int = Field(8192, gt=0)
    max_output_tokens: int | None = Field(None, gt=0)
    tags: list[str] = Field(default_factory=list)
    tier: Literal["small", "medium", "large", "frontier"] | None = None
    timeout_s: float | None = Field(None, gt=0)  # per attempt on this model, pinned or routed
    # Models to try when a request pinned to this model fails (otherwise a pinned request has none).
    fallbacks: list[str] = Field(default_factory=list)
    # Sampling parameters used when a request leaves them out (e.g. the model card's temperature).
    defaults: SamplingDefaults = Field(default_factory=SamplingDefaults)
    # Extra keyword arguments for the provider (e.g. litellm's api_version, local dtype/device).
    options: dict[str, object] = Field(default_factory=dict)
    # Replicas of an OpenAI-compatible model (instead of one base_url), balanced by in-flight requests.
    deployments: list[Deployment] = Field(default_factory=list, max_length=64)
    deployment_health: DeploymentHealth = Field(default_factory=DeploymentHealth)

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        return check_url(v)

    @model_validator(mode="after")
    def _check_provider_fields(self) -> ModelSpec:
        if self.deployments and self.provider != "openai":
            raise ValueError("deployments are replicas of an OpenAI-compatible server: provider 'openai' only")
        if self.deployments and self.base_url:
            raise ValueError("give either base_url or deployments (each with its base_url), not both")
        if self.provider == "openai" and not self.base_url and not self.deployments:
            raise ValueError("provider 'openai' needs base_url (e.g. https://api.openai.com/v1) or deployments")
        return self


class Range(_Strict):
    """A predicted difficulty range, both ends within 0..1."""

    min: float | None = None
    max: float | None = None

    @field_validator("min", "max")
    @classmethod
    def _unit(cls, v: float | None) -> float | None:
        if v is not None and not 0 <= v <= 1:
            raise ValueError(f"expected a difficulty between 0 and 1, got {v:g}")
        return v

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min:g} is above max {self.max:g}: no difficulty is in this range")
        return self


class Match(_Strict):
    """All given conditions must hold for the route to match."""

    category: list[str] | None = Field(None, min_length=1)  # the router's predicted category is one of these
    difficulty: Range | None = None  # predicted difficulty 0..1 in range
    model: list[str] | None = Field(None, min_length=1)  # the client asked for one of these virtual models
    metadata: dict[str, str] | None = None  # request `metadata` has these key/values
    tags: list[str] | None = None  # the request's `metadata.tags` includes all of these
    pii: bool | None = None  # the prompt does (true) / does not (false) contain PII
    reasoning_effort: list[str] | None = Field(None, min_length=1)  # request reasoning_effort is one of these
    background: bool | None = None  # the client asked for a background job

    @field_validator("category")
    @classmethod
    def _known_categories(cls, v: list[str] | None) -> list[str] | None:
        known = ", ".join(repr(k) for k in CATEGORIES)
        unknown = [((i,), f"unknown category {c!r}; expected one of {known}")
                   for i, c in enumerate(v or []) if c not in CATEGORIES]
        if unknown:
            raise PathError(unknown)
        return v

    @property
    def always(self) -> bool:
        """True when no condition is set: the route takes every request that reaches it."""
        return all(v is None or (k in ("metadata", "tags") and not v) for k, v in self.model_dump().items())


class Cascade(_Strict):
    """`strategy: cascade`: cheap drafts answer first; a scorer reads each draft and the route's
    targets are paid only when no draft is accepted.

    drafts        models tried first, cheapest first (each once, no retries across them)
    scorer        how a draft is judged: a name (verifier, verifier-rules, logprobs, agreement,
                  checks) or a mapping with options, or {combine: min|mean|..., of: [...]}
    threshold     a draft whose score is >= threshold is the answer
    skip_below    the prompt router's P(draft answers well) below this: skip that draft
    trust_above   ... at or above this: serve that draft without scoring it (and stream it live)
    hedge_after_ms  a draft that has not answered by then races the next stage; the loser is cancelled
    logprobs      ask the drafts for token log-probs (what the `logprobs` scorer reads)
    """

    drafts: list[str] = Field(min_length=1, max_length=4)
    scorer: str | dict[str, Any] = "verifier"
    threshold: float = Field(0.5, ge=0, le=1)
    skip_below: float | None = Field(None, ge=0, le=1)
    trust_above: float | None = Field(None, ge=0, le=1)
    hedge_after_ms: float | None = Field(None, gt=0)
    logprobs: bool = False


class SemanticCache(_Strict):
    """Serve the answer to an earlier prompt whose embedding (the router's static embedder) is at
    least `threshold` cosine-similar to this one; everything else in the request must match exactly."""

    # chosen on the tune half of benchmarks/cache_quality.py (see docs/apis.md, "Response cache")
    threshold: float = Field(0.975, gt=0, le=1)


class CacheConfig(_Strict):
    """`cache:` (the whole policy, and per route: a route's keys override the global ones).
    See docs/apis.md, "Response cache", for what is cached and what is never."""

    enabled: bool = True  # a route's `cache: {enabled: false}` turns a global cache off there
    exact: bool = True  # the normalised request hash
    semantic: SemanticCache | None = None
    ttl_s: float = Field(300.0, gt=0, le=30 * 86400)
    max_entries: int = Field(10_000, ge=1, le=10_000_000)  # per route (in process: least recently used go)
    share_across_keys: bool = False  # one cache for every API key of the route (never by default)
    sampled: bool = False  # also cache answers sampled at temperature > 0 (or left at the default) with no seed

    def merged(self, override: CacheConfig | None) -> CacheConfig:
        """These settings with a route's own (`override`, only the keys it sets) on top."""
        if override is None:
            return self
        return self.model_copy(update={k: getattr(override, k) for k in override.model_fields_set})


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
    # How the plan becomes calls: `single` (one model, falling back down the plan), `cascade` (cheap
    # drafts first), `fusion` (a panel, then the targets synthesise) or `chain` (specialists' steps, then
    # the targets synthesise).
    strategy: Literal["single", "cascade", "fusion", "chain"] = "single"
    cascade: Cascade | None = None
    fusion: Fusion | None = None
    chain: Chain | None = None
    cache: CacheConfig | None = None  # overrides the policy's `cache:` for this route

    @model_validator(mode="after")
    def _strategy(self) -> Route:
        needs = {"cascade": "its drafts", "fusion": "its panel", "chain": "its planner and specialists"}
        for name, what in needs.items():
            if self.strategy == name and getattr(self, name) is None:
                raise PathError([((name,), f"strategy {name} needs a `{name}:` section with {what}")])
            if self.strategy != name and getattr(self, name) is not None:
                raise PathError([(("strategy",), f"a `{name}:` section needs `strategy: {name}`")])
        if self.cache is not None and self.cache.enabled and (self.strategy != "single" or self.mode == "background"):
            raise PathError([(("cache",), "the response cache serves `strategy: single` interactive routes; "
                              "remove `cache:` or set `enabled: false`")])
        c = self.cascade
        if c is not None and c.skip_below is not None and c.trust_above is not None and c.skip_below > c.trust_above:
            raise PathError([(("cascade", "skip_below"), f"{c.skip_below:g} is above trust_above ({c.trust_above:g})")])
        if self.soft_timeout_s and self.hard_timeout_s and self.soft_timeout_s >= self.hard_timeout_s:
            raise PathError([(("soft_timeout_s",), f"must be below hard_timeout_s ({self.hard_timeout_s:g})")])
        return self


class Retry(_Strict):
    attempts: int = Field(2, ge=0, le=10)  # retries per candidate (after the first try)
    backoff_s: float = Field(0.2, ge=0)
    backoff_max_s: float = Field(5.0, ge=0)
    retry_after_max_s: float = Field(10.0, ge=0)  # cap on an upstream's retry-after

    @model_validator(mode="after")
    def _ordered(self) -> Retry:
        if self.backoff_s > self.backoff_max_s:
            raise PathError([(("backoff_s",), f"{self.backoff_s:g} is above backoff_max_s "
                               f"({self.backoff_max_s:g}), the cap on every wait")])
        return self


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
    learning: Learning = Field(default_factory=Learning)  # online learning from feedback (policy/learning.py)


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
    jobs: JobsConfig = Field(default_factory=JobsConfig)
    keys: KeysSection = Field(default_factory=KeysSection)  # a list in the file (see policy/keys.py)
    privacy: Privacy = Field(default_factory=Privacy)
    # Other names for models and virtual models: a request for `gpt-4` is a request for its target.
    aliases: dict[str, str] = Field(default_factory=dict)
    # The response cache (off when absent here and in every route).
    cache: CacheConfig | None = None

    @field_validator("keys", mode="before")
    @classmethod
    def _key_list(cls, v: object) -> object:
        return v if isinstance(v, KeysSection) else KeysSection.from_entries(v)

    @field_validator("models")
    @classmethod
    def _names(cls, v: dict[str, ModelSpec]) -> dict[str, ModelSpec]:
        for name in v:
            if not name or name.strip() != name:
                raise ValueError(f"model name {name!r} must be non-empty with no surrounding spaces")
        return v

    @model_validator(mode="after")
    def _references(self) -> Policy:
        problems = reference_problems(self)
        if problems:
            raise PathError(problems)
        return self

    @cached_property
    def routes_on_pii(self) -> bool:
        """Does any rule need the PII verdict (a route that matches on `pii`, or `privacy.on_pii`)?"""
        return self.privacy.on_pii is not None or any(r.match.pii is not None for r in self.routes)


def composed_models(route: Route) -> list[tuple[tuple, str]]:
    """(key path in the route, model) for every model a route's fusion or chain section names."""
    for name in ("fusion", "chain"):
        section = getattr(route, name, None)
        if section is not None:
            return [((name, *where), model) for where, model in models_named(section)]
    return []


def cache_problems(policy: Policy, skip: frozenset[int | str] = frozenset()) -> list[tuple[tuple, str]]:
    """A cache (global, or a route's merged over it) that would cache nothing."""
    problems: list[tuple[tuple, str]] = []
    base = (policy.cache if "cache" not in skip else None) or CacheConfig()
    for loc, cfg in [(("cache",), policy.cache), *((("routes", i, "cache"), r.cache)
                                                    for i, r in enumerate(policy.routes))]:
        if not isinstance(cfg, CacheConfig) or loc[0] in skip or (len(loc) > 1 and loc[1] in skip):
            continue
        eff = cfg if loc == ("cache",) else base.merged(cfg)
        if eff.enabled and not eff.exact and eff.semantic is None:
            problems.append(((*loc, "exact"), "a cache with `exact: false` needs `semantic:` (or `enabled: false`)"))
    return problems


def reference_problems(policy: Policy, skip: frozenset[int | str] = frozenset()) -> list[tuple[tuple, str]]:
    """Every cross-reference problem: unknown or duplicate names, routes no request can reach, keys
    and routes naming what does not exist. `skip`: indices of routes that failed validation (a
    salvaged policy holds placeholders there, with the name, targets and fallbacks that were
    well-formed) and names of sections that did."""
    problems: list[tuple[tuple, str]] = []
    models, virtual = policy.models, policy.router.virtual_models
    seen: set[str] = set()
    catch_all: int | None = None
    for i, route in enumerate(policy.routes):
        if route.name in seen and i not in skip:
            problems.append((("routes", i, "name"), f"duplicate route name {route.name!r}"))
        seen.add(route.name)
        for field in ("targets", "fallbacks"):
            for j, name in enumerate(getattr(route, field)):
                if name not in models:
                    problems.append((("routes", i, field, j),
                                     f"unknown model {name!r}; defined models: {', '.join(sorted(models))}"))
        for j, name in enumerate(route.cascade.drafts if route.cascade else []):
            if name not in models:
                problems.append((("routes", i, "cascade", "drafts", j),
                                 f"unknown model {name!r}; defined models: {', '.join(sorted(models))}"))
        for where, name in composed_models(route):
            if name not in models:
                problems.append((("routes", i, *where),
                                 f"unknown model {name!r}; defined models: {', '.join(sorted(models))}"))
        for j, name in enumerate(route.match.model or []):
            if name not in virtual:
                why = "a request for a policy model is pinned to it and" if name in models else "it"
                problems.append((("routes", i, "match", "model", j),
                                 f"{name!r} is not one of router.virtual_models ({', '.join(virtual)}); "
                                 f"{why} never reaches the routes"))
        if catch_all is not None:
            first = policy.routes[catch_all].name
            problems.append((("routes", i), f"unreachable: route {first!r} (routes[{catch_all}]) matches every "
                             "request before it; move this route above it or give that one a match"))
        elif route.match.always and i not in skip:
            catch_all = i
    for name, spec in models.items():
        for j, other in enumerate(spec.fallbacks if spec is not None else []):  # None: failed validation
            if other not in models:
                problems.append((("models", name, "fallbacks", j),
                                 f"unknown model {other!r}; defined models: {', '.join(sorted(models))}"))
    embedding = {n for n, spec in models.items() if spec is not None and spec.kind == "embedding"}
    for i, route in enumerate(policy.routes):
        named = [("targets", j, n) for j, n in enumerate(route.targets)]
        named += [("fallbacks", j, n) for j, n in enumerate(route.fallbacks)]
        named += [("cascade", "drafts", j, n) for j, n in enumerate(route.cascade.drafts if route.cascade else [])]
        named += [(*where, n) for where, n in composed_models(route)]
        for *where, n in named:
            if n in embedding:
                problems.append((("routes", i, *where), f"{n!r} is an embedding model; routes answer chat "
                                 "requests (embedding models answer POST /v1/embeddings by name)"))
    for name in embedding:
        if models[name].fallbacks:
            problems.append((("models", name, "fallbacks"), "an embedding model takes no fallbacks: vectors "
                             "from another model cannot be compared with its own"))
    for vm in virtual:
        if vm in models:
            problems.append((("router", "virtual_models"), f"{vm!r} is also a model name"))
    for alias, target in policy.aliases.items():
        if not alias or alias.strip() != alias:
            problems.append((("aliases", alias), f"alias {alias!r} must be non-empty with no surrounding spaces"))
        elif alias in models or alias in virtual:
            what = "a model" if alias in models else "a virtual model"
            problems.append((("aliases", alias), f"alias {alias!r} shadows {what} of that name; rename the alias"))
        elif target not in models and target not in virtual:
            more = " (an alias names a model, not another alias)" if target in policy.aliases else ""
            problems.append((("aliases", alias), f"alias {alias!r} points to {target!r}, which is neither a model "
                             f"nor a virtual model{more}; defined: {', '.join([*sorted(models), *virtual])}"))
    problems += cache_problems(policy, skip)
    if "jobs" not in skip:
        problems += policy.jobs.route_problems(policy.routes)
    if "keys" not in skip:
        problems += policy.keys.reference_problems(set(models) | set(virtual), {r.name for r in policy.routes})
    return problems

