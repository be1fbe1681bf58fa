"""The scorer interface: what a cascade asks of every scorer, and how scorers combine.

A scorer reads a draft answer and returns a score in [0, 1], an estimate of P(the draft is good);
the cascade accepts the draft when the score reaches the route's threshold and escalates
otherwise. Every scorer implements `score_draft(Draft) -> float`; the convenience entry points are

    scorer.score(prompt, answer, **extra)             # text in hand (extra: Draft's other fields)
    scorer.score_completion(request_body, completion)  # an OpenAI request and chat.completion

`Draft` carries everything a scorer may read: the request text, the answer, the request body
(`response_format`, `tools`), the draft's completion (`logprobs`, `tool_calls`), other samples (for
`agreement`) and the prompt router's predicted quality of the draft model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from concilium.router.text import content_text, request_text


@dataclass(frozen=True)
class Draft:
    prompt: str
    answer: str
    request: dict[str, Any] | None = None  # the OpenAI request body
    completion: dict[str, Any] | None = None  # the draft's chat.completion
    samples: tuple[str, ...] = ()  # other answers to the same request (other samples or models)
    router_quality: float | None = None  # the prompt router's P(draft model answers well)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_openai(cls, request: dict[str, Any], completion: dict[str, Any], samples: Sequence[str] = (),
                    router_quality: float | None = None) -> Draft:
        """A draft from a request body and the draft model's chat.completion (first choice)."""
        prompt, _ = request_text(request)
        return cls(prompt, completion_text(completion), request, completion, tuple(samples), router_quality)


def completion_text(completion: dict[str, Any] | None) -> str:
    """The first choice's message content of a chat.completion ("" when absent)."""
    if not isinstance(completion, dict):
        return ""
    choices = completion.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return ""
    msg = choices[0].get("message") or {}
    return content_text(msg.get("content")) if isinstance(msg, dict) else ""


def clip01(x: float) -> float:
    return 0.0 if x != x else min(max(float(x), 0.0), 1.0)  # NaN -> 0


class Scorer:
    """Base class. Subclasses set `name` and implement `score_draft`."""

    name = "scorer"

    def score_draft(self, draft: Draft) -> float:
        raise NotImplementedError

    def score(self, prompt: str, answer: str, **extra: Any) -> float:
        known = {k: extra.pop(k) for k in ("request", "completion", "samples", "router_quality") if k in extra}
        if "samples" in known:
            known["samples"] = tuple(known["samples"])
        return self.score_draft(Draft(prompt, answer, extra=extra, **known))

    def score_completion(self, request: dict[str, Any], completion: dict[str, Any], samples: Sequence[str] = (),
                         router_quality: float | None = None) -> float:
        return self.score_draft(Draft.from_openai(request, completion, samples, router_quality))

    def describe(self) -> dict[str, Any]:
        """A JSON-able description (for explanations and the replay report)."""
        return {"scorer": self.name}


COMBINE_MODES = ("min", "mean", "max", "product", "weighted")


class Combined(Scorer):
    """Several scorers as one: `min` (every scorer must accept: the default), `mean`, `max`,
    `product`, or `weighted` (weighted mean, weights normalised)."""

    name = "combine"

    def __init__(self, scorers: Sequence[Scorer], how: str = "min", weights: Sequence[float] | None = None) -> None:
        if not scorers:
            raise ValueError("combine needs at least one scorer")
        if how not in COMBINE_MODES:
            raise ValueError(f"unknown combine mode {how!r}; known: {', '.join(COMBINE_MODES)}")
        if weights is not None:
            if len(weights) != len(scorers):
                raise ValueError(f"combine: {len(weights)} weights for {len(scorers)} scorers")
            if any(w < 0 for w in weights) or sum(weights) <= 0:
                raise ValueError("combine: weights must be >= 0 and not all zero")
        elif how == "weighted":
            weights = [1.0] * len(scorers)
        self.scorers = list(scorers)
        self.how = how
        self.weights = None if weights is None else [float(w) for w in weights]

    def parts(self, draft: Draft) -> list[float]:
        return [clip01(s.score_draft(draft)) for s in self.scorers]

    def score_draft(self, draft: Draft) -> float:
        xs = self.parts(draft)
        if self.how == "min":
            return min(xs)
        if self.how == "max":
            return max(xs)
        if self.how == "product":
            out = 1.0
            for x in xs:
                out *= x
            return out
        if self.how == "mean" and self.weights is None:
            return sum(xs) / len(xs)
        w = self.weights or [1.0] * len(xs)
        return sum(a * b for a, b in zip(xs, w, strict=True)) / sum(w)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"scorer": "combine", "how": self.how, "of": [s.describe() for s in self.scorers]}
        if self.weights is not None:
            out["weights"] = self.weights
        return out


def combine(*scorers: Scorer, how: str = "min", weights: Sequence[float] | None = None) -> Combined:
    return Combined(scorers, how, weights)
