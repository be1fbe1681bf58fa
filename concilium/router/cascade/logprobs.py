"""The `logprobs` scorer: confidence from the draft's token log-probabilities.

Reads an OpenAI-shaped `choices[0].logprobs.content` list (`[{"token", "logprob", ...}, ...]`,
what OpenAI, vLLM and llama.cpp's server return when asked with `logprobs: true`) and aggregates
the per-token log-probabilities into one number, returned as a probability exp(aggregate):

- `mean`: the mean log-probability (exp of it is the inverse per-token perplexity);
- `min`: the least likely token (one confident mistake is enough to doubt the answer);
- `quantile` (default, q = 0.1): the q-quantile of the token log-probabilities — Chow's rule of
  rejecting low-confidence predictions applied to a sequence, robust to a single odd token.

Tokens that are pure whitespace are skipped by default. When the completion carries no
log-probabilities the score is `missing` (default 0.0: escalate, since nothing vouches for the draft).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from concilium.router.cascade.base import Draft, Scorer

AGGREGATES = ("mean", "min", "quantile")


def token_logprobs(completion: dict[str, Any] | None, skip_whitespace: bool = True) -> list[float]:
    """The first choice's token log-probabilities, in order ([] when the completion has none)."""
    if not isinstance(completion, dict):
        return []
    choices = completion.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return []
    lp = choices[0].get("logprobs")
    content = lp.get("content") if isinstance(lp, dict) else None
    if not isinstance(content, list):
        return []
    out = []
    for item in content:
        if not isinstance(item, dict):
            continue
        v = item.get("logprob")
        if isinstance(v, bool) or not isinstance(v, int | float) or math.isnan(v):
            continue
        tok = item.get("token")
        if skip_whitespace and isinstance(tok, str) and tok and not tok.strip():
            continue
        out.append(min(float(v), 0.0))
    return out


def quantile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default method) of a non-empty sequence."""
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def aggregate(logprobs: Sequence[float], how: str = "quantile", q: float = 0.1) -> float:
    """The aggregated log-probability (<= 0) of a non-empty list."""
    if not logprobs:
        raise ValueError("no log-probabilities")
    if how == "mean":
        return sum(logprobs) / len(logprobs)
    if how == "min":
        return min(logprobs)
    if how == "quantile":
        return quantile(logprobs, q)
    raise ValueError(f"unknown aggregate {how!r}; known: {', '.join(AGGREGATES)}")


class LogprobScorer(Scorer):
    name = "logprobs"

    def __init__(self, how: str = "quantile", q: float = 0.1, missing: float = 0.0,
                 skip_whitespace: bool = True) -> None:
        if how not in AGGREGATES:
            raise ValueError(f"unknown aggregate {how!r}; known: {', '.join(AGGREGATES)}")
        if not 0.0 <= q <= 1.0:
            raise ValueError("q must be in [0, 1]")
        if not 0.0 <= missing <= 1.0:
            raise ValueError("missing must be in [0, 1]")
        self.how, self.q, self.missing, self.skip_whitespace = how, q, missing, skip_whitespace

    def score_draft(self, draft: Draft) -> float:
        lps = token_logprobs(draft.completion, self.skip_whitespace)
        if not lps:
            return self.missing
        return math.exp(aggregate(lps, self.how, self.q))

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"scorer": self.name, "how": self.how}
        if self.how == "quantile":
            out["q"] = self.q
        return out
