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

The section is a typed part of `Policy` (`policy.jobs`), validated with the rest of the file; its
problems carry their key path (`jobs.queues[1]`, `routes[2].queue`). `background_reason()` is the
routing rule `router.decide()` calls.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from concilium.core.plan import Prediction
from concilium.policy.errors import Loc, PathError

if TYPE_CHECKING:
    from concilium.policy.schema import Policy, Route


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
                raise _at(("queues", i), f"queue name {q!r} must be letters, digits, '-', '_' or '.'")
            if q in self.queues[:i]:
                raise _at(("queues", i), f"queue {q!r} is listed twice")
        if self.default_queue not in self.queues:
            raise _at(("default_queue",), f"{self.default_queue!r} is not one of queues {self.queues}")
        for name, cap in self.per_key.items():
            if cap < 1:
                raise _at(("per_key", name), f"cap must be at least 1, got {cap}")
        if self.soft_timeout_s >= self.hard_timeout_s:
            raise _at(("soft_timeout_s",), f"must be below hard_timeout_s ({self.hard_timeout_s:g})")
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

    def route_problems(self, routes: list[Route]) -> list[tuple[Loc, str]]:
        """Routes that name a queue this section does not list."""
        return [(("routes", i, "queue"), f"unknown queue {r.queue!r}; jobs.queues lists {self.queues}")
                for i, r in enumerate(routes) if r.queue is not None and r.queue not in self.queues]


def _at(loc: Loc, msg: str) -> PathError:
    """A problem at its path inside the section."""
    return PathError([(loc, msg)])


def background_reason(body: dict[str, Any], policy: Policy, route: Route | None,
                      prediction: Prediction | None) -> str | None:
    """Why this request should run as a background job, or None to answer it interactively."""
    if route is not None and route.mode == "background":
        return f"route {route.name} runs in the background"
    d = policy.jobs.divert
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
