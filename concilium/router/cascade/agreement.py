"""The `agreement` scorer: do several answers to the same request agree?

Given the draft and k other answers (more samples of the same model, or the answers of other
cheap models, in `Draft.samples`), each answer is reduced to a normalised final answer
(`answers.normalise_final`: the final number in canonical form, an option letter A-E, or the last
line of the code block's output) and the score is the share of all answers that agree with the
draft's. One dissenting answer among three gives 2/3; a threshold of 1.0 escalates on any
disagreement. A draft with no readable final answer scores 0. With no other answers there is
nothing to compare: the score is `alone` (default 0.5, i.e. "no evidence either way").

`majority(answers)` gives the most common normalised answer and its share, for a cascade that
answers with the majority instead of the first draft.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from concilium.router.cascade.answers import normalise_final
from concilium.router.cascade.base import Draft, Scorer

KINDS = ("auto", "number", "option", "code_output")


def agreement_share(answer: str, others: Sequence[str], kind: str = "auto") -> float | None:
    """Share of [answer, *others] whose normalised final answer equals `answer`'s; None if `answer`
    has no readable final answer."""
    mine = normalise_final(answer, kind)
    if mine is None:
        return None
    same = 1 + sum(1 for o in others if normalise_final(o, kind) == mine)
    return same / (1 + len(others))


def majority(answers: Sequence[str], kind: str = "auto") -> tuple[str | None, float]:
    """(most common normalised final answer, its share of all answers); ties go to the earliest."""
    norm = [normalise_final(a, kind) for a in answers]
    counts = Counter(n for n in norm if n is not None)
    if not counts:
        return None, 0.0
    best = max(counts.values())
    winner = next(n for n in norm if n is not None and counts[n] == best)
    return winner, best / len(answers)


class AgreementScorer(Scorer):
    name = "agreement"

    def __init__(self, kind: str = "auto", alone: float = 0.5) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown answer kind {kind!r}; known: {', '.join(KINDS)}")
        if not 0.0 <= alone <= 1.0:
            raise ValueError("alone must be in [0, 1]")
        self.kind, self.alone = kind, alone

    def score_draft(self, draft: Draft) -> float:
        if not draft.samples:
            return self.alone
        share = agreement_share(draft.answer, draft.samples, self.kind)
        return 0.0 if share is None else share

    def describe(self) -> dict[str, Any]:
        return {"scorer": self.name, "kind": self.kind}
