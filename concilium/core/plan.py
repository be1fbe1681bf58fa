"""The RoutePlan: the router's decision as a plain, serialisable value.

It is what `POST /v1/route` returns, what the response headers summarise and what a background
job receives. Keep it free of live objects (providers, sessions) so it can cross process lines.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

Mode = Literal["interactive", "background"]


class Candidate(BaseModel):
    """One model the plan may call, in rank order."""

    model: str  # the policy's model name
    provider: str  # provider kind: local | openai | litellm
    predicted_quality: float | None = None  # P(answers well), 0..1, when a predictor ran
    est_cost_usd: float | None = None  # estimated cost of this request on this model
    timeout_s: float | None = None  # per attempt on this model; None = the plan's timeout_s
    reason: str = ""  # why it is here (route target, fallback, ranked by objective, ...)


class Skipped(BaseModel):
    """A model the plan would have used but cannot call (no key, circuit open, prompt too long), and why."""

    model: str
    reason: str


class CascadeStep(BaseModel):
    """One draft of a cascade: planned (model, threshold, what the prompt router expects of it) and,
    once it ran, what happened (score, accepted, tokens, cost, time)."""

    model: str
    action: Literal["score", "trust", "skip"] = "score"  # trust: served unscored; skip: not called
    threshold: float | None = None
    router_quality: float | None = None  # the prompt router's P(this model answers well)
    reason: str = ""
    score: float | None = None
    accepted: bool | None = None
    usage: dict | None = None
    cost_usd: float | None = None
    latency_s: float | None = None
    error: str | None = None


class Step(BaseModel):
    """One call of a composition (`fusion` or `chain`): planned (role, model, what it reads) and,
    once it ran, what happened. The answers themselves are not part of the plan."""

    id: str  # p1, p2 (panel), l2.p1 (a second Mixture-of-Agents layer), plan, s1 (chain steps), synth
    role: Literal["planner", "panelist", "specialist", "synthesiser"]
    model: str
    layer: int = 1
    seed: int | None = None  # a panelist sampled more than once: each sample its own seed
    category: str | None = None  # a chain step's category (the planner's, else the router's)
    task: str | None = None  # a chain step's part of the request (text of the request: not logged)
    after: list[str] = Field(default_factory=list)  # the steps whose results this one reads
    reason: str = ""
    est_cost_usd: float | None = None
    status: Literal["planned", "ok", "failed", "cancelled", "restored"] = "planned"
    usage: dict | None = None
    cost_usd: float | None = None
    latency_s: float | None = None
    error: str | None = None


class Decision(BaseModel):
    """What an online-learning router decided (router.learning): the context, the trained router's
    predictions, each router's pick, what was chosen and with what probability. Logged, and joined
    to feedback by request id (see router/online.py)."""

    x: list[float]  # the context vector (category probabilities, difficulty): never the prompt
    q: dict[str, float]  # the trained router's P(answers well) for each candidate
    choices: dict[str, str]  # router (static, learner) -> the model it would pick
    live: Literal["static", "learner"]
    chosen: str
    propensity: float  # P(chosen) under the live router with exploration
    explored: bool = False  # chosen by the exploration draw, not the live router
    version: str = ""  # the router version that decided


class Prediction(BaseModel):
    """What the learned dispatcher predicted for the request (absent for rule-only decisions)."""

    category: str | None = None
    category_probs: dict[str, float] = Field(default_factory=dict)
    difficulty: float | None = None  # 0 (trivial) .. 1 (hardest)
    difficulty_label: str | None = None
    difficulty_probs: dict[str, float] = Field(default_factory=dict)
    quality: dict[str, float] = Field(default_factory=dict)  # model name -> P(answers well)
    output_tokens: float | None = None  # predicted length of the answer
    pii: bool | None = None


class RoutePlan(BaseModel):
    request_id: str
    requested_model: str
    route: str  # name of the matched route, or "pinned" when the client named a model
    mode: Mode = "interactive"
    candidates: list[Candidate]  # ranked; the caller tries them in order
    skipped: list[Skipped] = Field(default_factory=list)
    reasons: list[str] = Field(default_factory=list)
    prediction: Prediction | None = None
    rule: str | None = None  # the route rule that matched, in words
    objective: str | None = None
    threshold: float | None = None
    timeout_s: float | None = None  # per attempt
    retries: int = 0  # retries per candidate before falling back
    queue: str | None = None  # background queue name when mode == "background"
    # `cascade`: the drafts are tried first, in order; `candidates` answer only when no draft is accepted.
    strategy: Literal["single", "cascade", "fusion", "chain"] = "single"
    cascade: list[CascadeStep] = Field(default_factory=list)
    scorer: dict | None = None  # the cascade's scorer, as a policy spec
    escalation_p: float | None = None  # predicted chance that no draft is accepted (from the prompt router)
    # `fusion` / `chain`: the calls before the synthesis (the synthesiser is `candidates`), as a small DAG.
    steps: list[Step] = Field(default_factory=list)
    # A chain planned by a model: how many steps it may still add, and the models they may use
    # (what the budget reserves for).
    pending_steps: int = 0
    pending_models: list[str] = Field(default_factory=list)
    decision: Decision | None = None  # set when router.learning is on and the router chose between models

    @property
    def summary(self) -> str:
        """One line for the x-concilium-reason header (no newlines; the header percent-encodes what is
        not printable ASCII): the choice, the route and any skipped models first, then the rest
        (ranking, prediction) as room allows."""
        first = self.reasons[:2] + [r for r in self.reasons[2:] if r.startswith("skipped")]
        rest = [r for r in self.reasons[2:] if not r.startswith("skipped")]
        return "; ".join(first + rest).replace("\r", " ").replace("\n", " ")[:500]
