"""The policy's `jobs:` section: what becomes a background job, its queues, caps and timeouts.

```yaml
jobs:
  divert:                      # besides routes with `mode: background`, these requests become jobs
    background: true           # the client sent `background: true`
    reasoning_effort: [high]   # the client's reasoning_effort is one of these
    min_difficulty: 0.9        # the router predicted a difficulty at or above this (0..1)
    min_output_tokens: 4000    # the router predicted an answer at least this long
  queues: [high, default, low] # Celery queues, highest priority first
  default_queue: default
  max_active_per_key: 16       # queued + running jobs per API key; more gets 429
  per_key: {team-batch: 200}   # overrides by key id
  soft_timeout_s: 600          # stop gracefully and keep the partial answer (a route's value wins)
  hard_timeout_s: 900          # kill the job (a route's value wins)
  chat_wait_s: 10              # a non-streaming chat request diverted to a job waits this long
  result_ttl_s: 86400          # results and events are kept this long after a job ends
  max_attempts: 3              # deliveries of one job (worker lost) before it is failed
```

`parse_jobs()` validates the section and reports problems as a PolicyError naming the file and the
key path (`jobs.queues[1]`, `routes[2].queue`). `jobs_config()` is the cached, never-failing
accessor the hot path uses; `background_reason()` is the routing rule `router.decide()` calls.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from concilium.core.plan import Prediction
from concilium.policy.loader import PolicyError, format_loc
from concilium.policy.schema import Policy, Route

log = logging.getLogger("concilium.policy")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Divert(_Strict):
    background: bool = True
    reasoning_effort: list[str] = Field(default_factory=lambda: ["high"])
    min_difficulty: float | None = Field(None, ge=0, le=1)
    min_output_tokens: int | None = Field(None, gt=0)


class JobsConfig(_Strict):
    divert: Divert = Field(default_factory=Divert)
    queues: list[str] = Field(default_factory=lambda: ["high", "default", "low"], min_length=1)
    default_queue: str = "default"
    max_active_per_key: int = Field(16, ge=1)
    per_key: dict[str, int] = Field(default_factory=dict)
    soft_timeout_s: float = Field(600.0, gt=0)
    hard_timeout_s: float = Field(900.0, gt=0)
    chat_wait_s: float = Field(10.0, ge=0, le=600)
    result_ttl_s: int = Field(86400, ge=60)
    max_attempts: int = Field(3, ge=1, le=20)

    @model_validator(mode="after")
    def _check(self) -> JobsConfig:
        for i, q in enumerate(self.queues):
            if not q or not q.replace("-", "").replace("_", "").replace(".", "").isalnum():
                raise _At(("queues", i), f"queue name {q!r} must be letters, digits, '-', '_' or '.'")
            if q in self.queues[:i]:
                raise _At(("queues", i), f"queue {q!r} is listed twice")
        if self.default_queue not in self.queues:
            raise _At(("default_queue",), f"{self.default_queue!r} is not one of queues {self.queues}")
        for name, cap in self.per_key.items():
            if cap < 1:
                raise _At(("per_key", name), f"cap must be at least 1, got {cap}")
        if self.soft_timeout_s >= self.hard_timeout_s:
            raise _At(("soft_timeout_s",), f"must be below hard_timeout_s ({self.hard_timeout_s:g})")
        return self

    def cap_for(self, key_id: str) -> int:
        return self.per_key.get(key_id, self.max_active_per_key)

    def timeouts(self, route: Route | None) -> tuple[float | None, float]:
        """(soft, hard) seconds for a job on this route; soft is None when it would not come first."""
        hard = (route.hard_timeout_s if route and route.hard_timeout_s else None) or self.hard_timeout_s
        soft = (route.soft_timeout_s if route and route.soft_timeout_s else None) or self.soft_timeout_s
        return (soft if soft < hard else None), hard

    def queue_for(self, route_queue: str | None, service_tier: Any = None) -> str:
        """The route's queue, else by the client's service_tier (priority/flex), else the default."""
        if route_queue:
            return route_queue
        if service_tier == "priority":
            return self.queues[0]
        if service_tier == "flex":
            return self.queues[-1]
        return self.default_queue


class _At(ValueError):
    """A problem that knows its path inside the `jobs` section."""

    def __init__(self, loc: tuple[str | int, ...], msg: str) -> None:
        super().__init__(msg)
        self.loc = loc
        self.msg = msg


def parse_jobs(policy: Policy, file: str = "<policy>") -> JobsConfig:
    """Validate `policy.jobs` (and the routes' job settings against it), or raise PolicyError."""
    problems: list[tuple[str, str]] = []
    try:
        cfg = JobsConfig.model_validate(policy.jobs or {})
    except ValidationError as e:
        for err in e.errors():
            at = (err.get("ctx") or {}).get("error")
            if isinstance(at, _At):
                problems.append((format_loc(("jobs", *at.loc)), at.msg))
                continue
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key (see docs/jobs.md for the jobs section's keys)"
            problems.append((format_loc(("jobs", *err["loc"])), msg))
        raise PolicyError(file, problems) from None
    for i, route in enumerate(policy.routes):
        if route.queue is not None and route.queue not in cfg.queues:
            problems.append((format_loc(("routes", i, "queue")),
                             f"unknown queue {route.queue!r}; jobs.queues lists {cfg.queues}"))
        if route.soft_timeout_s and route.hard_timeout_s and route.soft_timeout_s >= route.hard_timeout_s:
            problems.append((format_loc(("routes", i, "soft_timeout_s")),
                             f"must be below hard_timeout_s ({route.hard_timeout_s:g})"))
    if problems:
        raise PolicyError(file, problems)
    return cfg


_cache: dict[int, tuple[Policy, JobsConfig]] = {}
_cache_lock = threading.Lock()


def _remember(policy: Policy, cfg: JobsConfig) -> None:
    with _cache_lock:
        if len(_cache) >= 8:
            _cache.clear()
        _cache[id(policy)] = (policy, cfg)


def check_policy(policy: Policy, file: str) -> None:
    """Validate a loaded policy's `jobs:` section (a section check for the policy loader)."""
    _remember(policy, parse_jobs(policy, file))


def jobs_config(policy: Policy) -> JobsConfig:
    """The parsed section, cached per policy object. An invalid section (which the gateway and the
    workers refuse at start) falls back to the defaults here, with one error in the log."""
    hit = _cache.get(id(policy))
    if hit is not None and hit[0] is policy:
        return hit[1]
    try:
        cfg = parse_jobs(policy)
    except PolicyError as e:
        log.error("jobs section invalid, using defaults:\n%s", e)
        cfg = JobsConfig()
    _remember(policy, cfg)
    return cfg


def background_reason(body: dict[str, Any], policy: Policy, route: Route | None,
                      prediction: Prediction | None) -> str | None:
    """Why this request should run as a background job, or None to answer it interactively."""
    if route is not None and route.mode == "background":
        return f"route {route.name} runs in the background"
    d = jobs_config(policy).divert
    if d.background and body.get("background") is True:
        return "the client asked for background"
    effort = body.get("reasoning_effort")
    if effort is None and isinstance(body.get("reasoning"), dict):
        effort = body["reasoning"].get("effort")
    if effort is not None and effort in d.reasoning_effort:
        return f"reasoning_effort={effort}"
    if prediction is not None:
        if d.min_difficulty is not None and prediction.difficulty is not None \
                and prediction.difficulty >= d.min_difficulty:
            return f"predicted difficulty {prediction.difficulty:.2f} >= {d.min_difficulty:g}"
        if d.min_output_tokens is not None and prediction.output_tokens is not None \
                and prediction.output_tokens >= d.min_output_tokens:
            return f"predicted output {prediction.output_tokens:.0f} tokens >= {d.min_output_tokens}"
    return None
