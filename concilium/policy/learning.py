"""`router.learning:` the router that keeps learning from feedback (see docs/learning.md).

    router:
      learning:
        enabled: true
        explore: 0.05         # share of requests (live only) sent to a random candidate
        promote: manual       # manual (`concilium router promote`) | auto
        min_events: 500       # auto: rewarded decisions needed before promotion is considered
        rollback_margin: 0.05 # live: back to shadow when its reward is this far below the static router's
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Learning(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    enabled: bool = False
    # The online learner's starting state: `shadow` (decides and logs, does not route) until promoted.
    explore: float = Field(0.05, ge=0, le=0.2)
    bonus: float = Field(0.1, ge=0, le=2)  # optimism for what it has seen little of (UCB width)
    ridge: float = Field(4.0, gt=0)  # prior strength: how many events of evidence the router's own guess is worth
    ridge_unknown: float = Field(1.0, gt=0)  # ... for a model the trained router never saw (a tier prior)
    promote: Literal["manual", "auto"] = "manual"
    min_events: int = Field(500, ge=10)
    rollback_margin: float = Field(0.05, ge=0, le=1)
    log_retention: int = Field(100_000, ge=100, le=10_000_000)  # decisions kept in the log
    log_features: bool = True  # the router's feature summary (never the prompt) in each logged decision
