"""The request categories the dispatcher predicts, and how the public data sets' labels map onto them."""

from __future__ import annotations

from concilium.policy.schema import CATEGORIES as CATEGORIES  # the policy's vocabulary (`match.category`)

# LLMRouter `task_name` -> category.
LLMROUTER_TASKS: dict[str, str] = {
    "math": "math",
    "gsm8k": "math",
    "agentverse-mgsm": "math",
    "mbpp": "code",
    "human_eval": "code",
    "mmlu": "knowledge",
    "gpqa": "knowledge",
    "natural_qa": "knowledge",
    "trivia_qa": "knowledge",
    "arc_challenge": "knowledge",
    "openbook_qa": "knowledge",
    "commonsense_qa": "reasoning",
    "agentverse-logicgrid": "reasoning",
    "commongen": "creative",
}

# MT-Bench / FastChat question categories -> category.
MT_BENCH: dict[str, str] = {
    "writing": "creative",
    "roleplay": "chat",
    "reasoning": "reasoning",
    "math": "math",
    "coding": "code",
    "extraction": "extraction",
    "stem": "knowledge",
    "humanities": "knowledge",
}

# Arena-Hard v2 subcategories (the shipped artifact trains on one hashed half, the benchmark scores the other).
ARENA_HARD: dict[str, str] = {"coding": "code", "math": "math", "creative_writing": "creative"}

_MMLU_MATH = ("mathematics", "algebra", "statistics", "econometrics")
_MMLU_REASONING = ("formal_logic", "logical_fallacies")


def mmlu_subject(subject: str) -> str:
    """MMLU subject (file name without `mmlu_`) -> category."""
    if any(k in subject for k in _MMLU_MATH):
        return "math"
    if subject in _MMLU_REASONING:
        return "reasoning"
    return "knowledge"


def routerdc_file(stem: str) -> str:
    """RouterDC file stem (e.g. `gsm8k-test`, `humaneval_train`) -> category."""
    s = stem.lower()
    if s.startswith(("gsm8k", "math")):
        return "math"
    if s.startswith(("humaneval", "mbpp", "javascript")):
        return "code"
    if s.startswith("arc_"):
        return "reasoning"
    return "knowledge"
