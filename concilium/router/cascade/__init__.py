"""Answer-reading building blocks for cascades: scorers that estimate P(the draft answer is good).

    from concilium.router.cascade import build_scorer, Draft
    scorer = build_scorer("verifier")                    # or a mapping, see registry.py
    p = scorer.score_completion(request_body, draft_completion)   # in [0, 1]
    accept = p >= threshold

Modules: `answers` (final answers, numbers, re-checked arithmetic), `features` (verifier
features), `verifier` (trained and rule-based verifiers), `logprobs`, `agreement`, `checks`,
`base` (the interface and `combine`), `registry` (scorers from policy specs), `grading`
(RouteLLM and numeric grading), `evaluate` (offline cascade evaluation), `replay` (the
`concilium eval replay` program).
"""

from __future__ import annotations

import importlib
from typing import Any

# Names are imported on first use, so `concilium --help` (which imports `replay`) stays light.
_EXPORTS = {
    "AgreementScorer": "agreement", "agreement_share": "agreement", "majority": "agreement",
    "Combined": "base", "Draft": "base", "Scorer": "base", "combine": "base", "completion_text": "base",
    "ChecksScorer": "checks", "run_checks": "checks",
    "LogprobScorer": "logprobs",
    "ScorerSpecError": "registry", "build_scorer": "registry",
    "RulesVerifier": "verifier", "Verifier": "verifier", "VerifierConfig": "verifier", "VerifierError": "verifier",
    "load_verifier": "verifier", "train_verifier": "verifier",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
