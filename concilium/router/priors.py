"""A prior P(answers well) for a model the trained artifact has never seen.

Built from what the policy declares: the tier (or, without one, the output price), the tags
(a `code` tag helps on code, `math` on math, ...), and the request's predicted category and
difficulty. Small and local models lose more on hard prompts than frontier ones. The numbers are
deliberately plain so that an operator can predict the order before any training.
"""

from __future__ import annotations

from concilium.policy.schema import ModelSpec

TIER_BASE = {"small": 0.50, "medium": 0.62, "large": 0.72, "frontier": 0.80}
# How much quality falls from an average (0.5) to the hardest (1.0) prompt, per tier.
TIER_DIFFICULTY_SLOPE = {"small": 0.60, "medium": 0.45, "large": 0.32, "frontier": 0.20}
TAG_BONUS = 0.10  # at full confidence in a category the model is tagged for
LOCAL_PENALTY = 0.03

# Tags that name a category, with a few common spellings.
TAG_CATEGORY = {
    "code": "code",
    "coding": "code",
    "programming": "code",
    "math": "math",
    "reasoning": "reasoning",
    "knowledge": "knowledge",
    "qa": "knowledge",
    "creative": "creative",
    "writing": "creative",
    "chat": "chat",
    "extraction": "extraction",
}


def tier_of(spec: ModelSpec) -> str:
    """The declared tier, else one guessed from the output price (USD per million tokens)."""
    if spec.tier:
        return spec.tier
    if spec.provider == "local":
        return "small"
    out = spec.price.output
    if out <= 0:
        return "medium"
    if out < 1.0:
        return "small"
    if out < 5.0:
        return "medium"
    if out < 20.0:
        return "large"
    return "frontier"


def prior_quality(spec: ModelSpec, category_probs: dict[str, float], difficulty: float) -> float:
    tier = tier_of(spec)
    q = TIER_BASE[tier] - TIER_DIFFICULTY_SLOPE[tier] * (difficulty - 0.5)
    tags = {t.lower() for t in spec.tags}
    for tag in tags:
        cat = TAG_CATEGORY.get(tag)
        if cat is not None:
            q += TAG_BONUS * category_probs.get(cat, 0.0)
    if "local" in tags or spec.provider == "local":
        q -= LOCAL_PENALTY * difficulty
    return min(max(q, 0.02), 0.98)
