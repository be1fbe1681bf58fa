"""Labelled prompt sets (no model outcomes) as training records for the category and difficulty heads.

Each reader takes one published file unchanged and returns `Outcome`s with empty `scores` and a
`category` and/or an explicit 0..1 `difficulty`:

| source       | file                                   | category                      | difficulty              |
|--------------|----------------------------------------|-------------------------------|-------------------------|
| mt-bench     | FastChat `mt_bench/question.jsonl`     | its 8 categories, mapped      | -                       |
| arena-hard   | arena-hard-auto v2 `question.jsonl`    | coding / math / creative      | -                       |
| math         | MATH `test.jsonl` (`level`: Level 1-5) | math                          | (level - 1) / 4         |
| gsm8k        | grade-school-math `train.jsonl`        | math                          | -                       |
| humaneval    | human-eval `HumanEval.jsonl(.gz)`      | code                          | -                       |
| wizardlm     | WizardLM `WizardLM_testset.jsonl`      | its skills, where they map    | (difficulty - 1) / 9    |

`split_of(prompt)` puts every prompt, by a hash of its normalised text, in the "train" or "test"
half, so that the shipped artifact can learn from one half of a set and be scored on the other.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from concilium.router import categories as cat
from concilium.router.outcomes import Outcome, OutcomeError, numbered_jsonl, prompt_key

# WizardLM test-set skills -> category (skills not listed stay unlabelled for the category head).
WIZARDLM_SKILLS: dict[str, str] = {
    "Math": "math",
    "Code Generation": "code",
    "Code Debug": "code",
    "Writting": "creative",
    "Academic Writing": "creative",
    "Reasoning": "reasoning",
    "Roleplay": "chat",
}

LABELLED_SOURCES = ("mt-bench", "arena-hard", "math", "gsm8k", "humaneval", "wizardlm")


def split_of(prompt: str, test_share: float = 0.5) -> str:
    """'train' or 'test', stable across runs and machines (a hash of the normalised prompt)."""
    h = int.from_bytes(hashlib.sha256(prompt_key(prompt).encode()).digest()[:8], "big") / 2**64
    return "test" if h < test_share else "train"


def _rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    for n, obj in numbered_jsonl(path):
        if not isinstance(obj, dict):
            raise OutcomeError(f"{path}:{n}: expected a JSON object")
        yield n, obj


def _field(obj: dict, key: str, where: str) -> Any:
    if key not in obj:
        raise OutcomeError(f"{where}: missing `{key}`")
    return obj[key]


def _text(value: Any, where: str) -> str:
    if isinstance(value, list) and value and isinstance(value[0], str):
        value = value[0]  # multi-turn: the first user turn is what a router sees first
    if not isinstance(value, str) or not value.strip():
        raise OutcomeError(f"{where}: the prompt must be a non-empty string")
    return value


def _level(value: Any, lo: int, hi: int, where: str) -> float | None:
    """'Level 3' / '3' / 3 -> 0..1 on [lo, hi]; unparsable levels ('Level ?') give None."""
    parts = str(value).split() if value is not None else []
    s = parts[-1] if parts else ""
    if s.startswith("-") and s[1:].isdigit():
        raise OutcomeError(f"{where}: level {s} is outside {lo}..{hi}")
    if not (s.isascii() and s.isdigit()):
        return None
    v = int(s)
    if not lo <= v <= hi:
        raise OutcomeError(f"{where}: level {v} is outside {lo}..{hi}")
    return (v - lo) / (hi - lo)


def read_labelled(source: str, path: str | Path) -> list[Outcome]:
    """Read one labelled prompt file by source name (see `LABELLED_SOURCES`)."""
    if source not in LABELLED_SOURCES:
        raise OutcomeError(f"unknown labelled source {source!r}; known: {', '.join(LABELLED_SOURCES)}")
    p = Path(path)
    if not p.is_file():
        raise OutcomeError(f"{p}: no such file")
    out: list[Outcome] = []
    for n, obj in _rows(p):
        where = f"{p}:{n}"
        category: str | None
        difficulty: float | None = None
        if source == "mt-bench":
            prompt = _text(_field(obj, "turns", where), where)
            category = cat.MT_BENCH.get(str(_field(obj, "category", where)))
        elif source == "arena-hard":
            prompt = _text(_field(obj, "prompt", where), where)
            category = cat.ARENA_HARD.get(str(obj.get("subcategory", "")))
        elif source == "math":
            prompt = _text(_field(obj, "problem", where), where)
            category, difficulty = "math", _level(obj.get("level"), 1, 5, where)
        elif source == "gsm8k":
            prompt, category = _text(_field(obj, "question", where), where), "math"
        elif source == "humaneval":
            prompt, category = _text(_field(obj, "prompt", where), where), "code"
        else:  # wizardlm
            prompt = _text(_field(obj, "Instruction", where), where)
            category = WIZARDLM_SKILLS.get(str(obj.get("Skill", "")))
            difficulty = _level(obj.get("Difficulty"), 1, 10, where)
        if category is None and difficulty is None:
            continue  # nothing to learn from this prompt
        out.append(Outcome(prompt=prompt, scores={}, id=f"{source}-{n}", category=category, source=source,
                           difficulty=difficulty))
    if not out:
        raise OutcomeError(f"{p}: no labelled prompts found for source {source!r}")
    return out


def half(records: list[Outcome], which: str, test_share: float = 0.5) -> list[Outcome]:
    """The records whose prompt falls in `which` ('train' or 'test') of `split_of`."""
    return [r for r in records if split_of(r.prompt, test_share) == which]
