"""Grading a recorded answer against a reference answer, two ways.

- `routellm`: RouteLLM's GSM8K grading — commas removed, the *last run of digits* in the answer
  compared with the reference's. "$18.00" ends in "00", so a right answer written with cents is
  marked wrong (42 of GPT-4's 1,307 GSM8K answers in RouteLLM's file).
- `numeric`: the final answer (`answers.final_answer`: after `####`, in `\\boxed{}`, after "the
  answer is", else the last number) parsed as a number and compared with the reference's value.
"""

from __future__ import annotations

import re

from concilium.router.cascade.answers import final_answer, parse_number

GRADINGS = ("routellm", "numeric")
_DIGITS = re.compile(r"\d+")


def routellm_grade(answer: str, reference: str) -> float:
    a = _DIGITS.findall(answer.replace(",", ""))
    r = _DIGITS.findall(reference.replace(",", ""))
    return float(bool(a) and bool(r) and int(a[-1]) == int(r[-1]))


def numeric_grade(answer: str, reference: str, tol: float = 1e-6) -> float:
    v = final_answer(answer).value
    ref = parse_number(reference)
    return float(v is not None and ref is not None and abs(v - ref) <= tol * max(1.0, abs(ref)))


def grade(answer: str, reference: str, how: str = "numeric") -> float:
    if how == "routellm":
        return routellm_grade(answer, reference)
    if how == "numeric":
        return numeric_grade(answer, reference)
    raise ValueError(f"unknown grading {how!r}; known: {', '.join(GRADINGS)}")
