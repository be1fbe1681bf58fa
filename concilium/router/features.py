"""Cheap lexical features of a prompt: length, code, math notation, question form, language, turns.

All are computed with a handful of precompiled regular expressions (tens of microseconds for a
few thousand characters) and scaled to roughly unit range so that a linear model can use them
beside a sentence embedding.
"""

from __future__ import annotations

import math
import re

import numpy as np

_RE = {
    "digits": re.compile(r"\d"),
    "numbers": re.compile(r"\d+(?:[.,]\d+)?"),
    "fence": re.compile(r"```"),
    "code_kw": re.compile(
        r"\b(?:def|class|import|return|function|const|let|var|public|static|void|#include|SELECT|lambda|"
        r"print|printf|console\.log|fn|impl|struct)\b"
    ),
    "code_sym": re.compile(r"[{};]|==|!=|=>|->|\+\+|::"),
    "latex": re.compile(r"\$|\\(?:frac|sqrt|sum|int|cdot|times|pi|le|ge|infty|boxed|left|right)"),
    "math_op": re.compile(r"(?<=[\d\s)])[+\-*/^=<>](?=[\s\d(])"),
    "math_words": re.compile(
        r"\b(?:how many|how much|calculate|compute|solve|equation|integer|sum|product|probability|"
        r"percent|remainder|total|average|ratio|prove)\b",
        re.I,
    ),
    "qmark": re.compile(r"\?"),
    "wh_start": re.compile(r"^\s*(?:what|why|how|when|where|who|which|is|are|can|does|do|should)\b", re.I),
    "choices": re.compile(r"(?m)^\s*\(?[A-Ea-e][).:]\s"),
    "imperative_write": re.compile(
        r"\b(?:write|compose|draft|story|poem|essay|blog|lyrics|imagine|pretend|role-?play)\b", re.I
    ),
    "imperative_extract": re.compile(
        r"\b(?:extract|summari[sz]e|list all|identify|classify|parse|json|table|format the)\b", re.I
    ),
    "chat_words": re.compile(r"\b(?:hi|hello|hey|thanks|thank you|how are you|please|you)\b", re.I),
    "reasoning_words": re.compile(r"\b(?:if|then|therefore|because|must|implies|true|false|logic)\b", re.I),
    "url": re.compile(r"https?://|www\."),
    "non_ascii": re.compile(r"[^\x00-\x7f]"),
    "cjk": re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]"),
    "newline": re.compile(r"\n"),
    "word": re.compile(r"\w+"),
}

FEATURE_NAMES: tuple[str, ...] = (
    "log_chars",
    "log_words",
    "log_lines",
    "turns",
    "code_fences",
    "code_keywords",
    "code_symbols",
    "latex",
    "math_ops",
    "math_words",
    "digit_ratio",
    "log_numbers",
    "question_marks",
    "wh_start",
    "ends_with_question",
    "choices",
    "write_words",
    "extract_words",
    "chat_words",
    "reasoning_words",
    "url",
    "non_ascii_ratio",
    "cjk_ratio",
    "short_prompt",
)

N_FEATURES = len(FEATURE_NAMES)


def _squash(count: int, scale: float = 1.0) -> float:
    return math.log1p(count) / scale


def lexical_features(text: str, turns: int = 1) -> np.ndarray:
    """A float32 vector of N_FEATURES lexical features."""
    n = len(text)
    inv = 1.0 / max(n, 1)
    words = len(_RE["word"].findall(text))
    f = (
        math.log1p(n) / 8.0,
        math.log1p(words) / 7.0,
        _squash(len(_RE["newline"].findall(text)), 4.0),
        min(turns, 10) / 5.0,
        _squash(len(_RE["fence"].findall(text)), 2.0),
        _squash(len(_RE["code_kw"].findall(text)), 3.0),
        _squash(len(_RE["code_sym"].findall(text)), 4.0),
        _squash(len(_RE["latex"].findall(text)), 3.0),
        _squash(len(_RE["math_op"].findall(text)), 3.0),
        _squash(len(_RE["math_words"].findall(text)), 2.0),
        min(len(_RE["digits"].findall(text)) * inv * 5.0, 1.0),
        _squash(len(_RE["numbers"].findall(text)), 3.0),
        _squash(len(_RE["qmark"].findall(text)), 2.0),
        1.0 if _RE["wh_start"].search(text) else 0.0,
        1.0 if text.rstrip().endswith("?") else 0.0,
        _squash(len(_RE["choices"].findall(text)), 2.0),
        _squash(len(_RE["imperative_write"].findall(text)), 2.0),
        _squash(len(_RE["imperative_extract"].findall(text)), 2.0),
        _squash(len(_RE["chat_words"].findall(text)), 2.0),
        _squash(len(_RE["reasoning_words"].findall(text)), 3.0),
        1.0 if _RE["url"].search(text) else 0.0,
        min(len(_RE["non_ascii"].findall(text)) * inv * 3.0, 1.0),
        min(len(_RE["cjk"].findall(text)) * inv * 2.0, 1.0),
        1.0 if words <= 8 else 0.0,
    )
    return np.asarray(f, dtype=np.float32)


def lexical_matrix(texts: list[str], turns: list[int] | None = None) -> np.ndarray:
    turns = turns or [1] * len(texts)
    return np.stack([lexical_features(t, k) for t, k in zip(texts, turns, strict=True)]) if texts else (
        np.zeros((0, N_FEATURES), dtype=np.float32)
    )
