"""Features of a (prompt, draft answer) pair, for the `verifier` scorer.

Blocks (a verifier's config names the blocks it uses, so the same code computes them at training
and at scoring time):

- `answer` (ANSWER_FEATURES): final answer presence and form (`####`, `\\boxed{}`, "the answer
  is", a bare last number, none; non-integer, negative, magnitude), re-checked arithmetic
  (`answers.check_arithmetic`: equations checked, wrong, annotation errors), length, lines and
  steps, hedging words, truncation, and overlap with the prompt's numbers (share of the prompt's
  numbers the answer uses, share of the answer's numbers found in the prompt or computed, whether
  the final answer merely repeats a prompt number, whether it is the last computed result);
- `prompt_lexical` / `answer_lexical`: the router's 24 lexical features (`router.features`) of
  each side;
- `hashed`: hashed, signed word unigrams and bigrams of the answer and of the prompt (each side in
  its own half of `hash_dim` buckets), log counts, L2-normalised — a TF-IDF stand-in that needs no
  fitted vocabulary (CRC32 hashes: stable across processes, unlike Python's `hash`);
- `embedding`: the router's static sentence embedding of the prompt and of the answer.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Sequence

import numpy as np

from concilium.router.cascade.answers import check_arithmetic, final_answer, numbers, unescape_markdown
from concilium.router.features import FEATURE_NAMES as LEXICAL_NAMES
from concilium.router.features import lexical_features

ANSWER_FEATURES: tuple[str, ...] = (
    "final_marker",
    "final_boxed",
    "final_phrase",
    "final_last_number",
    "final_none",
    "final_non_integer",
    "final_negative",
    "final_log_magnitude",
    "final_in_prompt",
    "final_is_last_result",
    "markers",
    "text_after_marker",
    "log_checked",
    "log_wrong",
    "any_wrong",
    "wrong_share",
    "wrong_annotation",
    "log_chars",
    "log_lines",
    "log_steps",
    "hedges",
    "any_hedge",
    "truncated",
    "prompt_numbers_used",
    "answer_numbers_grounded",
    "log_prompt_numbers",
    "length_ratio",
)
N_ANSWER = len(ANSWER_FEATURES)
BLOCKS = ("answer", "prompt_lexical", "answer_lexical", "hashed", "embedding")

_HEDGES = re.compile(
    r"(?i)\b(?:however|but since|assum\w*|approximately|about|round\w*|not possible|cannot|can't|impossible|"
    r"actually|wait|sorry|unclear|not enough information|doesn't make sense|does not make sense|mistake|"
    r"let me|re-?evaluate|recalculate|contradict\w*|estimate|roughly|nearest|whole number|partial)\b"
)
_NUMBER_WORDS = {
    "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
    "ten": 10, "eleven": 11, "twelve": 12, "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "hundred": 100,
    "half": 0.5, "twice": 2, "double": 2, "triple": 3, "dozen": 12, "quarter": 0.25, "third": 3,
}
_WORDS = re.compile(r"[a-z]+")
_TOKENS = re.compile(r"[a-z]+|\d+|[#=<>$%?]+")
_RESULT = re.compile(r"=\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)")


def _prompt_numbers(prompt: str) -> set[float]:
    out = {round(v, 6) for v in numbers(prompt)}
    for w in _WORDS.findall(prompt.lower()):
        if w in _NUMBER_WORDS:
            out.add(float(_NUMBER_WORDS[w]))
    return out


def answer_features(prompt: str, answer: str) -> np.ndarray:
    """The `answer` block: N_ANSWER floats, each roughly in [0, 1] or a small log scale."""
    text = unescape_markdown(answer)
    fa = final_answer(text)
    arith = check_arithmetic(text)
    p_nums = _prompt_numbers(prompt)
    a_nums = [round(v, 6) for v in numbers(text)]
    results = [float(m.group(1).replace(",", "")) for m in _RESULT.finditer(text)]
    result_set = {round(v, 6) for v in results}
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    steps = sum(1 for ln in lines if "=" in ln)
    hedges = len(_HEDGES.findall(text))
    markers = text.count("####")
    after = text.rsplit("####", 1)[1].strip().split("\n", 1) if markers else [""]
    tail = text.rstrip()
    truncated = not markers and fa.kind != "boxed" and not (tail.endswith((".", "!", ")", "}")) or tail[-1:].isdigit())
    v = fa.value
    used = len({x for x in a_nums if x in p_nums}) / len(p_nums) if p_nums else 0.0
    grounded = sum(1 for x in a_nums if x in p_nums or x in result_set) / len(a_nums) if a_nums else 0.0
    last_result = results[-1] if results else None
    f = (
        fa.kind == "marker",
        fa.kind == "boxed",
        fa.kind == "phrase",
        fa.kind == "last",
        fa.kind == "none",
        v is not None and not fa.is_integer,
        v is not None and v < 0,
        math.log10(1.0 + abs(v)) / 6.0 if v is not None else 0.0,
        v is not None and round(v, 6) in p_nums,
        v is not None and last_result is not None and abs(v - last_result) < 1e-6,
        min(markers, 3) / 3.0,
        len(after) > 1 and bool(after[1].strip()),
        math.log1p(arith.checked) / 3.0,
        math.log1p(arith.wrong) / 2.0,
        arith.wrong > 0,
        arith.wrong / arith.checked if arith.checked else 0.0,
        arith.wrong_annotations > 0,
        math.log1p(len(text)) / 8.0,
        math.log1p(len(lines)) / 3.0,
        math.log1p(steps) / 3.0,
        math.log1p(hedges) / 2.0,
        hedges > 0,
        truncated,
        used,
        grounded,
        math.log1p(len(p_nums)) / 3.0,
        min(len(text) / max(len(prompt), 1), 10.0) / 10.0,
    )
    return np.asarray(f, dtype=np.float32)


def _hash_into(vec: np.ndarray, text: str, offset: int, size: int) -> None:
    toks = _TOKENS.findall(text.lower())
    grams = toks + [a + " " + b for a, b in zip(toks, toks[1:], strict=False)]
    for g in grams:
        h = zlib.crc32(g.encode())
        vec[offset + (h % size)] += 1.0 if (h >> 31) & 1 else -1.0


def hashed_features(prompt: str, answer: str, dim: int) -> np.ndarray:
    """Signed hashed unigram+bigram counts: answer in the first half, prompt in the second."""
    half = dim // 2
    vec = np.zeros(dim, dtype=np.float32)
    _hash_into(vec, answer, 0, half)
    _hash_into(vec, prompt, half, dim - half)
    vec = np.sign(vec) * np.log1p(np.abs(vec))
    n = float(np.sqrt(vec @ vec))
    return vec / n if n > 0 else vec


def feature_names(blocks: Sequence[str], hash_dim: int = 0, embedding_dim: int = 0) -> list[str]:
    names: list[str] = []
    for b in blocks:
        if b == "answer":
            names += list(ANSWER_FEATURES)
        elif b == "prompt_lexical":
            names += [f"prompt_{n}" for n in LEXICAL_NAMES]
        elif b == "answer_lexical":
            names += [f"answer_{n}" for n in LEXICAL_NAMES]
        elif b == "hashed":
            names += [f"hash_{i}" for i in range(hash_dim)]
        elif b == "embedding":
            names += [f"emb_prompt_{i}" for i in range(embedding_dim)] + [f"emb_answer_{i}" for i in range(embedding_dim)]
        else:
            raise ValueError(f"unknown feature block {b!r}; known: {', '.join(BLOCKS)}")
    return names


def pair_features(prompt: str, answer: str, blocks: Sequence[str], hash_dim: int = 0, embedder=None) -> np.ndarray:
    """One feature vector for (prompt, answer), the blocks concatenated in the given order."""
    parts = []
    for b in blocks:
        if b == "answer":
            parts.append(answer_features(prompt, answer))
        elif b == "prompt_lexical":
            parts.append(lexical_features(prompt))
        elif b == "answer_lexical":
            parts.append(lexical_features(answer))
        elif b == "hashed":
            parts.append(hashed_features(prompt, answer, hash_dim))
        elif b == "embedding":
            if embedder is None:
                raise ValueError("the embedding block needs an embedder")
            parts.append(embedder.encode(prompt))
            parts.append(embedder.encode(answer))
        else:
            raise ValueError(f"unknown feature block {b!r}; known: {', '.join(BLOCKS)}")
    return np.concatenate(parts).astype(np.float32)
