"""Outcome records: what the dispatcher trains and is evaluated on.

One JSON object per line (JSONL):

    {"prompt": "...", "scores": {"model-a": 1.0, "model-b": 0.0},
     "costs": {"model-a": 0.0021}, "id": "gsm8k-17", "category": "math",
     "source": "routellm-gsm8k", "output_tokens": {"model-a": 212}}

`prompt` (or `messages`, an OpenAI chat message list) is required, and `scores` (model -> 0..1,
higher is better) unless the record only labels the prompt with a `category` and/or a
`difficulty` (0..1), which trains those heads alone. `weight` (default 1) scales a record in
training. `responses` (model -> the answer text that model gave) lets `concilium router train`
fit an answer verifier and `concilium eval replay` replay the answers; `reference` is the reference
answer (e.g. GSM8K's final number) for numeric grading. Every other key is optional.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from concilium.router.categories import CATEGORIES
from concilium.router.text import request_text


class OutcomeError(ValueError):
    """A malformed outcome file; the message names the file and line."""


@dataclass
class Outcome:
    prompt: str
    scores: dict[str, float]
    costs: dict[str, float] = field(default_factory=dict)
    id: str | None = None
    category: str | None = None
    source: str | None = None
    difficulty: float | None = None  # an explicit 0..1 label (see train.py for when scores stand in)
    output_tokens: dict[str, float] = field(default_factory=dict)
    weight: float = 1.0
    responses: dict[str, str] = field(default_factory=dict)  # model -> the answer it gave
    reference: str | None = None  # the reference answer, when the data set has one

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"prompt": self.prompt, "scores": self.scores}
        for key in ("costs", "id", "category", "source", "difficulty", "output_tokens", "responses", "reference"):
            value = getattr(self, key)
            if value not in (None, {}):
                out[key] = value
        if self.weight != 1.0:
            out["weight"] = self.weight
        return out


def _number_map(value: Any, key: str, where: str, lo: float | None = None, hi: float | None = None) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise OutcomeError(f"{where}: `{key}` must be an object mapping model name to a number")
    out = {}
    for model, v in value.items():
        if isinstance(v, bool):
            v = float(v)
        if not isinstance(v, int | float) or not math.isfinite(v):
            raise OutcomeError(f"{where}: `{key}.{model}` must be a finite number, got {v!r}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise OutcomeError(f"{where}: `{key}.{model}` = {v} is outside [{lo}, {hi}]")
        out[str(model)] = float(v)
    return out


def parse_outcome(obj: Any, where: str = "<record>") -> Outcome:
    if not isinstance(obj, dict):
        raise OutcomeError(f"{where}: expected a JSON object")
    prompt = obj.get("prompt")
    if prompt is None and "messages" in obj:
        prompt, _ = request_text({"messages": obj["messages"]})
    if not isinstance(prompt, str) or not prompt.strip():
        raise OutcomeError(f"{where}: needs a non-empty `prompt` string (or a `messages` list)")
    scores = _number_map(obj.get("scores"), "scores", where, 0.0, 1.0)
    category = obj.get("category")
    if category is not None and category not in CATEGORIES:
        raise OutcomeError(f"{where}: unknown category {category!r}; known: {', '.join(CATEGORIES)}")
    difficulty = obj.get("difficulty")
    if difficulty is not None and (not isinstance(difficulty, int | float) or not 0 <= difficulty <= 1):
        raise OutcomeError(f"{where}: `difficulty` must be a number in [0, 1]")
    if not scores and category is None and difficulty is None:
        raise OutcomeError(
            f"{where}: needs `scores` (model -> score in [0, 1]), or at least a `category` or `difficulty` label"
        )
    weight = obj.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 < weight <= 1000:
        raise OutcomeError(f"{where}: `weight` must be a number in (0, 1000]")
    responses = obj.get("responses")
    if responses is None:
        responses = {}
    if not isinstance(responses, dict) or not all(isinstance(v, str) for v in responses.values()):
        raise OutcomeError(f"{where}: `responses` must be an object mapping model name to the answer text")
    reference = obj.get("reference")
    if reference is not None and not isinstance(reference, str | int | float):
        raise OutcomeError(f"{where}: `reference` must be a string or a number")
    return Outcome(
        prompt=prompt,
        scores=scores,
        responses={str(k): v for k, v in responses.items()},
        reference=None if reference is None else str(reference),
        costs=_number_map(obj.get("costs"), "costs", where, 0.0),
        id=None if obj.get("id") is None else str(obj["id"]),
        category=category,
        source=obj.get("source"),
        difficulty=None if difficulty is None else float(difficulty),
        output_tokens=_number_map(obj.get("output_tokens"), "output_tokens", where, 0.0),
        weight=float(weight),
    )


def numbered_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for each non-blank line of a JSONL file (gzip if it ends in .gz);
    errors name the file and line."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:  # bytes, decoded line by line, so a bad byte names its line
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise OutcomeError(f"{path}:{n}: not UTF-8 ({e.reason})") from None
                if not line.strip():
                    continue
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    raise OutcomeError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    except (OSError, EOFError) as e:
        raise OutcomeError(f"{path}: cannot read ({e})") from None


def read_outcomes(path: str | Path) -> list[Outcome]:
    p = Path(path)
    if not p.is_file():
        raise OutcomeError(f"{p}: no such file")
    out = [parse_outcome(obj, f"{p}:{n}") for n, obj in numbered_jsonl(p)]
    if not out:
        raise OutcomeError(f"{p}: no outcome records")
    return out


def write_outcomes(records: Iterable[Outcome], path: str | Path) -> int:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with p.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")
            n += 1
    return n


def models_of(records: Iterable[Outcome]) -> list[str]:
    """Every model that has a score somewhere, in first-seen order."""
    seen: dict[str, None] = {}
    for r in records:
        for m in r.scores:
            seen.setdefault(m, None)
    return list(seen)


def prompt_key(prompt: str) -> str:
    """A whitespace- and case-insensitive key to find the same prompt in two files."""
    return " ".join(prompt.lower().split())


def drop_prompts(records: list[Outcome], prompts: Iterable[str]) -> list[Outcome]:
    banned = {prompt_key(p) for p in prompts}
    return [r for r in records if prompt_key(r.prompt) not in banned]


def file_sha256(paths: Iterable[str | Path]) -> dict[str, str]:
    out = {}
    for p in paths:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        out[Path(p).name] = h.hexdigest()
    return out


def iter_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)
